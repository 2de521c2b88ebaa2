"""The export index (`WORKDIR/export/index.json`): one `ExportEntry` per exported SAE, the record
that eval, the browser and matching read the exports through.

In code a dictionary reads `input_site` and writes `output_site` (the same site for an SAE). The
file keeps the names it has always had, which released runs and users' scripts read: `site` is
the input, `target_site` a transcoder's output (null for an SAE).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# an entry's files: index key -> the format `save_sae` writes there
FORMAT_OF_KEY = {
  "gemma_scope": "gemma-scope",
  "gemma_scope_2": "gemma-scope-2",
  "int8": "int8",
  "saelens": "saelens",
  "saelens_batchtopk": "saelens-batchtopk",
}
FORMAT_KEYS = tuple(FORMAT_OF_KEY)


@dataclasses.dataclass(frozen=True)
class ExportEntry:
  name: str  # w{width}-l{λ}-s{seed}, or w{width}-k{k}-s{seed}
  kind: str  # config.kind (core/kinds.py)
  input_site: str | None  # what the encoder reads (None: a .npy source without config.site)
  output_site: str | None  # what the decoder writes: input_site for an SAE, the target for a transcoder
  prefixes: tuple[int, ...]  # Matryoshka prefix sizes, the width last; () otherwise
  width: int
  l1_coefficient: float | None  # None for TopK and BatchTopK SAEs
  seed: int
  step: int  # the checkpoint exported
  l0: float  # measured on `measured_rows` training rows
  dead_fraction: float  # latents that never fired on them
  scale: float  # C of the input, folded into the weights
  target_scale: float | None  # C of a transcoder's target; None for an SAE
  epochs: float  # how many times training saw its data
  measured_rows: int
  files: dict[str, str]  # format (FORMAT_KEYS) -> path
  activation: str = "jumprelu"  # how it was trained: jumprelu | topk | batchtopk (released as a JumpReLU)
  k: int | None = None  # TopK's and BatchTopK's k

  @property
  def sae_file(self) -> str:
    """The file readers load: the Gemma Scope npz, or SAELens' directory for TopK (the npz is JumpReLU's)."""
    return self.files.get("gemma_scope") or self.files["saelens"]

  def to_json(self) -> dict:
    """The entry as the index file holds it (its files' paths as top-level keys)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    input_site, output_site, files = fields.pop("input_site"), fields.pop("output_site"), fields.pop("files")
    name, kind = fields.pop("name"), fields.pop("kind")
    target_site = output_site if output_site != input_site else None
    sites = {"name": name, "kind": kind, "site": input_site, "target_site": target_site}
    return sites | fields | {"prefixes": list(self.prefixes)} | files

  @classmethod
  def from_json(cls, e: dict, where: str = "export/index.json") -> ExportEntry:
    try:
      return cls(
        name=e["name"],
        kind=e.get("kind", "sae"),
        input_site=e["site"],
        output_site=e.get("target_site") or e["site"],
        prefixes=tuple(e.get("prefixes", ())),
        width=e["width"],
        l1_coefficient=e["l1_coefficient"],
        seed=e["seed"],
        step=e["step"],
        l0=e["l0"],
        dead_fraction=e["dead_fraction"],
        scale=e["scale"],
        target_scale=e.get("target_scale"),
        epochs=e["epochs"],
        measured_rows=e["measured_rows"],
        files={k: e[k] for k in FORMAT_KEYS if k in e},
        activation=e.get("activation", "jumprelu"),
        k=e.get("k"),
      )
    except KeyError as missing:
      raise ValueError(
        f"{where}: entry {e.get('name', '?')!r} has no field {missing}; re-run `scope-jax export`"
      ) from None


def index_json(entries: list[ExportEntry]) -> str:
  return json.dumps([e.to_json() for e in entries], indent=2) + "\n"


def read_index(path: str | Path) -> list[ExportEntry]:
  """The entries of an export index; a file that is not one is an error naming it."""
  path = Path(path)
  try:
    return [ExportEntry.from_json(e, str(path)) for e in json.loads(path.read_text())]
  except (json.JSONDecodeError, TypeError, AttributeError) as e:  # not JSON, not a list of objects
    raise ValueError(f"{path}: not an export index, a JSON list of entries ({e}); re-run `scope-jax export`") from None
