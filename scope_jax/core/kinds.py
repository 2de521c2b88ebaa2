"""The kinds of dictionary a sweep trains (`config.kind`), and where each reads from and writes to.

An SAE reads a site and reconstructs it; a transcoder reads an MLP's input (`mlp_in.L`) and
predicts that MLP's output (`mlp.L`), with no pre-encoder bias (docs/recipe.md §4); a
skip-transcoder adds a dense `x @ W_skip` to the prediction. Everything that differs between the
kinds is asked of a `Kind` here, so a new kind is one entry of `KINDS` and the code its fields name.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Kind:
  name: str
  transcoder: bool  # predicts a target site from its input site (else reconstructs its input)
  skip: bool  # adds a dense skip connection `x @ W_skip` (W_skip [d_in, d_out])
  cross_layer: bool = False  # a CLT: reads every MLP input of a layer range, writes every later MLP output

  def target_of(self, site: str | None, target_site: str | None = None) -> str | None:
    """The site a dictionary of this kind reading `site` predicts: None for an SAE (it
    reconstructs `site`); for a transcoder `target_site` when given, else mlp.L for `site`
    mlp_in.L (None for any other site)."""
    if not self.transcoder:
      return None
    return target_site if target_site is not None else transcoder_target(site)

  def __str__(self) -> str:
    return self.name


def transcoder_sites(layer: int | str) -> tuple[str, str]:
  """(input, output) of layer `layer`'s MLP transcoder: mlp_in.L and mlp.L."""
  return f"mlp_in.{layer}", f"mlp.{layer}"


def transcoder_target(site: str | None) -> str | None:
  """mlp.L for mlp_in.L, the MLP output a transcoder of that MLP's input predicts; else None."""
  m = re.fullmatch(r"mlp_in\.(\d+)", site or "")
  return transcoder_sites(m.group(1))[1] if m else None


SAE = Kind("sae", transcoder=False, skip=False)
TRANSCODER = Kind("transcoder", transcoder=True, skip=False)
SKIP_TRANSCODER = Kind("skip_transcoder", transcoder=True, skip=True)
CLT = Kind("clt", transcoder=True, skip=False, cross_layer=True)  # sae/clt.py, train/clt.py
KINDS = {k.name: k for k in (SAE, TRANSCODER, SKIP_TRANSCODER, CLT)}  # docs/recipe.md §4, §14
TRANSCODER_KINDS = tuple(name for name, k in KINDS.items() if k.transcoder and not k.cross_layer)  # one layer each


def kind_named(name: str | Kind, field: str = "kind") -> Kind:
  """The `Kind` of `config.kind` (or of an index entry's `kind`), with an error naming the field."""
  if isinstance(name, Kind):
    return name
  if name not in KINDS:
    raise ValueError(f"{field} {name!r}: expected one of {list(KINDS)}")
  return KINDS[name]


def clt_layers(config) -> list[int]:
  """The model layers of `config`'s CLT: `clt.first_layer` … `clt.last_layer`."""
  return list(range(config.clt.first_layer, config.clt.last_layer + 1))


def clt_sites(layers) -> tuple[list[str], list[str]]:
  """(inputs, targets) of a CLT over `layers`: every mlp_in.L and every mlp.L."""
  pairs = [transcoder_sites(layer) for layer in layers]
  return [a for a, _ in pairs], [b for _, b in pairs]


def config_target_site(config) -> str | None:
  """The target site of `config`'s dictionaries (`Kind.target_of` of its kind, site and target_site)."""
  return kind_named(config.kind).target_of(config.site, config.target_site)


def topk_problem(kind: str, prefixes: tuple[int, ...]) -> str | None:
  """Why a TopK sweep of `kind` with Matryoshka `prefixes` cannot be released, or None."""
  if kind in TRANSCODER_KINDS:
    return (
      f"kind = {kind!r}: sweep.activation 'topk' trains SAEs only (SAELens, which releases TopK, has no TopK "
      "transcoder); use 'batchtopk', released as a JumpReLU transcoder"
    )
  if prefixes:
    return (
      f"sweep.prefixes = {prefixes!r}: a TopK SAE's prefix would rank its latents apart from the full width it "
      "trained with; use sweep.activation 'batchtopk' (its released θ serves every prefix)"
    )
  return None
