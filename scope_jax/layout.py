"""Where everything of a run lives, and which of its stages are finished.

    WORKDIR/
      activations/                  the store (`extract.store` puts it elsewhere, local or gs://)
      checkpoints/STEP/             orbax: every SAE stack, Adam state, step, counters, the run's identity
      metrics.jsonl, tensorboard/   one line / event per SAE per logged step
      train_health.json             the training-health warnings
      export/index.json             one entry per SAE; gemma-scope/… and saelens/… beside it
      report/metrics.json           evaluation; report.md, report.html and the plots beside it
      browse/index.html             the feature browser (scope_jax/browse): a static site
      stages/STAGE.json             a finished stage's marker: the identity of what it was run on
      LEASE                         the job holding the workdir (lease.py)

A stage is finished when its marker exists and holds the identity the current config and inputs
give it (for export: the checkpoint step and the export fields; for eval: the export's identity and
the eval fields). Nothing is judged by modification times, which NFS and gcsfuse do not keep
reliably; a marker whose identity differs means the stage must run again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

STAGES = ("export", "eval", "browse")


def kvstore_spec(root: str) -> dict:
  """tensorstore kvstore spec for a local path or `gs://bucket/prefix` (the GCS driver honours
  TENSORSTORE_GCS_HTTP_URL, which points tests at an emulator)."""
  if root.startswith("gs://"):
    bucket, _, prefix = root.removeprefix("gs://").partition("/")
    if not bucket:
      raise ValueError(f"store root {root!r}: no bucket")
    return {"driver": "gcs", "bucket": bucket, "path": prefix.strip("/") + "/" if prefix.strip("/") else ""}
  return {"driver": "file", "path": os.path.abspath(os.path.expanduser(root)) + "/"}


def differences(old, new, prefix: str = "") -> list[str]:
  """`["field.sub: old -> new", ...]` for every leaf that differs between two JSON-like records
  (what a resumed run compares: `new` is taken through JSON first, as `old` was when saved)."""
  new = json.loads(json.dumps(new)) if not prefix else new
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for k in sorted(set(old) | set(new)) for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
  return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def replace_directory(new: Path, old: Path) -> Path:
  """Puts the finished directory `new` where `old` is, so no file of `old` survives beside it.
  A crash leaves `old` whole, `new` whole under its own name, or `old` moved to `old.replaced`."""
  retired = old.with_name(old.name + ".replaced")
  shutil.rmtree(retired, ignore_errors=True)
  if old.exists():
    old.rename(retired)
  new.rename(old)
  shutil.rmtree(retired, ignore_errors=True)
  return old


class RunLayout:
  """The paths of one run's workdir (a local directory)."""

  def __init__(self, root: str | Path):
    self.root = Path(root)
    self.activations = self.root / "activations"
    self.checkpoints = self.root / "checkpoints"
    self.metrics = self.root / "metrics.jsonl"
    self.tensorboard = self.root / "tensorboard"
    self.health = self.root / "train_health.json"
    self.export = self.root / "export"
    self.export_index = self.export / "index.json"
    self.report = self.root / "report"
    self.report_metrics = self.report / "metrics.json"
    self.browse = self.root / "browse"

  def marker(self, stage: str) -> Path:
    if stage not in STAGES:
      raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    return self.root / "stages" / f"{stage}.json"

  def mark_finished(self, stage: str, identity: dict) -> None:
    """Records that `stage` finished on `identity` (atomically: a crash leaves the old marker or none)."""
    path = self.marker(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)

  def unmark(self, stage: str) -> None:
    """Forgets that `stage` finished (before it starts rewriting its outputs)."""
    self.marker(stage).unlink(missing_ok=True)

  def latest_checkpoint(self) -> int | None:
    """The step of the newest checkpoint (orbax names each step's directory by its number)."""
    if not self.checkpoints.is_dir():
      return None
    return max((int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit()), default=None)

  def to_do(self, stage: str, identity: dict, redo: Sequence[str] = ()) -> bool:
    """Whether `stage` must run on `identity`: not when its marker holds it; yes when there is
    no marker, when `redo` names the stage, or when only its inputs changed (a newer checkpoint,
    a new export). When its own config fields changed it is refused (a ValueError naming them):
    a finished result is replaced only when the user asks."""
    path = self.marker(stage)
    if stage in redo or not path.exists():
      return True
    changed = differences(json.loads(path.read_text()), identity)
    if own := [d for d in changed if d.startswith(f"{stage}.")]:
      raise ValueError(
        f"the {stage} in {self.root} was made with other {stage} fields:\n  "
        + "\n  ".join(own)
        + f"\nadd --redo={stage} to replace it, restore the fields, or use another workdir"
      )
    return bool(changed)

  def finished(self, stage: str, identity: dict) -> bool:
    """True when `stage`'s marker holds exactly `identity`."""
    path = self.marker(stage)
    return path.exists() and not differences(json.loads(path.read_text()), identity)


def export_identity(config, layout: RunLayout) -> dict:
  """What an export is made from: the latest checkpoint and the export fields."""
  return {"checkpoint": layout.latest_checkpoint(), "export": config.export.to_dict()}


def eval_identity(config, layout: RunLayout) -> dict:
  """What an evaluation is made from: the export and the eval fields."""
  return {"export": export_identity(config, layout), "eval": config.eval.to_dict()}
