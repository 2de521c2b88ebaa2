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
      .scope_jax.json               that this is a run (and, in a folder taken with --use_existing_workdir,
                                    the names above, which the run may write); in export/, browse/,
                                    report/ and each SAE folder, that scope_jax made the folder

Writers own only what they made (`owned`): a folder is replaced whole only when its `.scope_jax.json`
(or one in a folder above it) says scope_jax made it, and a file is overwritten only when scope_jax
wrote it; staging and retired folders have hidden names unique to the process that made them.

A stage is finished when its marker exists and holds the identity the current config and inputs
give it (for export: the checkpoint step and the export fields; for eval: the export's identity and
the eval fields). Nothing is judged by modification times, which NFS and gcsfuse do not keep
reliably; a marker whose identity differs means the stage must run again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

STAGES = ("export", "finetune", "eval", "browse")
FINETUNED_SUFFIX = "-kl"  # a KL-finetuned SAE's name (finetune/export/index.json): its export's name + this


# How gs:// is reached: tensorstore's retries of a failed request and the time a root has to answer
# first (config.storage; `set_storage_policy` puts a config's values here for the whole process).
STORAGE = {"timeout_s": 60.0, "retries": 5, "max_retry_delay_s": 16.0}


def set_storage_policy(storage) -> None:
  """Takes `config.storage` (timeout_s, retries, max_retry_delay_s) for every gs:// root opened later."""
  STORAGE.update({k: storage[k] for k in STORAGE})


def remote_timeout(root: str) -> float | None:
  """How long the first request to `root` may take: STORAGE's timeout for gs://, none for a local path."""
  return float(STORAGE["timeout_s"]) if str(root).startswith("gs://") else None


def gcs_hint(root: str) -> str:
  """For an error about a gs:// root: the bucket, the endpoint and the credentials that were looked for."""
  if not str(root).startswith("gs://"):
    return ""
  bucket = root.removeprefix("gs://").partition("/")[0]
  endpoint = os.environ.get("TENSORSTORE_GCS_HTTP_URL") or "https://storage.googleapis.com"
  key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
  gcloud = Path("~/.config/gcloud/application_default_credentials.json").expanduser()
  found = lambda p: "found" if Path(p).is_file() else "not found"
  return (
    f"\n  bucket {bucket!r} at endpoint {endpoint} (TENSORSTORE_GCS_HTTP_URL overrides it); credentials looked "
    f"for: GOOGLE_APPLICATION_CREDENTIALS ({f'{key}, {found(key)}' if key else 'unset'}), {gcloud} "
    f"({found(gcloud)}), then the GCE metadata server; {STORAGE['retries']} retries, first answer within "
    f"{STORAGE['timeout_s']:g} s (config.storage)"
  )


def kvstore_spec(root: str) -> dict:
  """tensorstore kvstore spec for a local path or `gs://bucket/prefix` (the GCS driver honours
  TENSORSTORE_GCS_HTTP_URL, which points tests at an emulator), with STORAGE's retries."""
  if root.startswith("gs://"):
    bucket, _, prefix = root.removeprefix("gs://").partition("/")
    if not bucket:
      raise ValueError(f"store root {root!r}: no bucket")
    retries = {
      "max_retries": int(STORAGE["retries"]),
      "initial_delay": "1s",
      "max_delay": f"{float(STORAGE['max_retry_delay_s'])}s",
    }
    return {
      "driver": "gcs",
      "bucket": bucket,
      "path": prefix.strip("/") + "/" if prefix.strip("/") else "",
      "context": {"gcs_request_retries": retries},
    }
  return {"driver": "file", "path": os.path.abspath(os.path.expanduser(root)) + "/"}


def differences(old, new, prefix: str = "") -> list[str]:
  """`["field.sub: old -> new", ...]` for every leaf that differs between two JSON-like records
  (what a resumed run compares: `new` is taken through JSON first, as `old` was when saved)."""
  new = json.loads(json.dumps(new)) if not prefix else new
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for k in sorted(set(old) | set(new)) for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
  return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


OWNER_FILE = ".scope_jax.json"  # what scope_jax made here: this folder whole, or the named files in it
# A workdir's own names: what a run writes at its top level (an adopted folder must not hold them already)
RUN_NAMES = (
  *("activations", "checkpoints", "metrics.jsonl", "tensorboard", "train_health.json"),
  *("export", "finetune", "report", "browse", "stages", "LEASE"),
)
# Signs of a run written before scope_jax marked its folders (OWNER_FILE): any of them makes it one
_OLD_RUN_SIGNS = ("stages/*.json", "metrics.jsonl", "activations/config.json", "train/*/stages/*.json")


class NotOurs(ValueError):
  """A folder or file that scope_jax did not make, where it would have replaced or overwritten it."""


def _owner_record(folder: Path) -> dict:
  try:
    record = json.loads((folder / OWNER_FILE).read_text())
  except (OSError, ValueError):
    return {}
  return record if isinstance(record, dict) else {}


def owned(path: str | Path) -> bool:
  """Whether scope_jax made `path`: it, or a folder above it, holds an OWNER_FILE saying the folder
  is scope_jax's, or names it (or the folder above it) among the files scope_jax wrote there."""
  path = Path(path).absolute()
  for p in (path, *path.parents):
    if _owner_record(p).get("folder"):
      return True
    if p.name in _owner_record(p.parent).get("files", ()):
      return True
  return False


def some_names(names: Iterable[str], shown: int = 5) -> str:
  """`names` sorted, the first `shown` of them and how many more: what an error shows of a folder."""
  names = sorted(names)
  return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_replaceable(target: Path) -> None:
  """Refuses (NotOurs) a `target` that is a file, or a non-empty folder scope_jax did not make."""
  if target.is_symlink() or (target.exists() and not target.is_dir()):
    raise NotOurs(f"{target} is a file (or link), not a folder scope_jax made; move it away or write elsewhere")
  if target.is_dir() and any(target.iterdir()) and not owned(target):
    held = some_names(p.name for p in target.iterdir())
    raise NotOurs(
      f"{target} is a folder scope_jax did not make (it holds {held}; no {OWNER_FILE} says it is "
      f"scope_jax's); scope_jax replaces only its own folders: move it away or choose another path"
    )


def check_writable(file: Path) -> None:
  """Refuses (NotOurs) to overwrite a `file` that exists and that scope_jax did not write."""
  if file.is_symlink() or file.is_dir() or (file.exists() and not owned(file)):
    raise NotOurs(
      f"{file} exists and scope_jax did not write it; it is left as it is: move it away or choose another path"
    )


def record_file(file: Path) -> None:
  """Notes in its folder's OWNER_FILE that scope_jax wrote `file` (so a later write may replace it)."""
  folder = file.parent
  if owned(file):
    return
  record = _owner_record(folder)
  record["files"] = sorted({*record.get("files", ()), file.name})
  _write_owner_record(folder, record)


def _write_owner_record(folder: Path, record: dict) -> None:
  tmp = folder / f"{OWNER_FILE}.{os.getpid()}.tmp"
  tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
  os.replace(tmp, folder / OWNER_FILE)


def own_folder(folder: Path, what: str) -> Path:
  """`folder`, made (and marked as scope_jax's) when absent; a non-empty folder scope_jax did not make
  is refused (NotOurs)."""
  check_replaceable(folder)
  mine = owned(folder)  # before it exists: inside a run's workdir, every folder is the run's
  folder.mkdir(parents=True, exist_ok=True)
  if not mine:
    _write_owner_record(folder, {"folder": True, "what": what})
  return folder


def new_staging(target: Path, what: str) -> Path:
  """A new folder, marked as scope_jax's, beside `target`, to be written whole and then swapped in by
  `replace_directory`. Its name is hidden and unique to this process, so it is no user's folder."""
  check_replaceable(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-{os.getpid()}-", dir=target.parent))
  _write_owner_record(staging, {"folder": True, "what": what})
  return staging


def discard(staging: Path) -> None:
  """Removes a staging folder this process made (`new_staging`) and did not swap in."""
  if f".staging-{os.getpid()}-" in staging.name and _owner_record(staging).get("folder"):
    shutil.rmtree(staging, ignore_errors=True)


def replace_directory(new: Path, old: Path) -> Path:
  """Puts the finished staging folder `new` where `old` is, so no file of `old` survives beside it;
  `old` must be absent, empty or scope_jax's (NotOurs otherwise, and `new` is discarded). A crash
  leaves `old` whole, `new` whole under its own name, or `old` under a hidden retired name."""
  try:
    check_replaceable(old)
  except NotOurs:
    discard(new)
    raise
  retired = None
  if old.exists():
    retired = old.with_name(f".{old.name}.retired-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    old.rename(retired)
  new.rename(old)
  if retired is not None:
    shutil.rmtree(retired, ignore_errors=True)
  return old


@contextlib.contextmanager
def staged_directory(target: Path, what: str) -> Iterator[Path]:
  """`with staged_directory(target, what) as staging:` write the folder whole in `staging`; at the
  end of the block it replaces `target` (an error in the block discards it, `target` untouched)."""
  staging = new_staging(target, what)
  try:
    yield staging
  except BaseException:
    discard(staging)
    raise
  replace_directory(staging, target)


def open_workdir(root: str | Path, use_existing: bool = False, names: Sequence[str] = RUN_NAMES) -> Path:
  """Takes `root` as a run's workdir, refusing (NotOurs) a non-empty folder that is not a scope_jax
  run. With `use_existing` such a folder is used anyway, provided none of the run's `names` is there
  already: scope_jax then writes only those names in it, and notes them as its own."""
  root = Path(root)
  if root.exists() and not root.is_dir():
    raise NotOurs(f"--workdir {root} is a file, not a folder")
  others = [p.name for p in root.iterdir() if p.name != "LEASE"] if root.is_dir() else []  # LEASE: this job's
  if others and not (owned(root) or _owner_record(root).get("run")):
    if any(next(root.glob(sign), None) for sign in _OLD_RUN_SIGNS):  # a run of an older scope_jax
      with contextlib.suppress(OSError):  # a finished run on a read-only disk is read, never changed
        _write_owner_record(root, {"folder": True, "run": True})
      return root
    if not use_existing:
      raise NotOurs(
        f"--workdir {root} is a folder that is not a scope_jax run (it holds {some_names(others)}); use a new or "
        f"empty folder, or add --use_existing_workdir to write the run's own files into it (it never "
        f"replaces or removes what it did not make)"
      )
    if taken := sorted(n for n in names if n != "LEASE" and ((root / n).exists() or (root / n).is_symlink())):
      raise NotOurs(
        f"--workdir {root} already holds {', '.join(taken)}, which a run writes; scope_jax leaves them "
        f"as they are: move them away or use another folder"
      )
    _write_owner_record(root, {"folder": False, "run": True, "files": sorted(names)})  # an adopted folder
    return root
  root.mkdir(parents=True, exist_ok=True)
  if not (owned(root) or _owner_record(root).get("run")):
    _write_owner_record(root, {"folder": True, "run": True})
  return root


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
    self.finetune = self.root / "finetune"  # KL finetuning (scope_jax/finetune): checkpoints, metrics, export
    self.finetune_checkpoints = self.finetune / "checkpoints"
    self.finetune_metrics = self.finetune / "metrics.jsonl"
    self.finetune_export = self.finetune / "export"
    self.finetune_index = self.finetune_export / "index.json"
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
  """What an export is made from: the latest checkpoint, the matmuls' precision (every later stage's
  too) and the export fields."""
  return {"checkpoint": layout.latest_checkpoint(), "precision": config.precision, "export": config.export.to_dict()}


def finetune_identity(config, layout: RunLayout) -> dict:
  """What a KL finetuning is made from: the export, the model, the text and the finetune fields."""
  text = {"data.text": list(config.data.text), "data.holdout_every": config.data.holdout_every}
  return {"export": export_identity(config, layout), "model": config.model, "text": text} | {
    "finetune": config.finetune.to_dict()
  }


def finetune_is_current(config, layout: RunLayout) -> bool:
  """Whether the finetuned SAEs (finetune/export/) are of the current export: the finetune finished
  on it. After a new export they are not, until `scope-jax finetune` runs again."""
  marker = layout.marker("finetune")
  return marker.exists() and not differences(json.loads(marker.read_text())["export"], export_identity(config, layout))


def eval_identity(config, layout: RunLayout) -> dict:
  """What an evaluation is made from: the export, the finetuned SAEs (when there are) and the eval fields."""
  identity = {"export": export_identity(config, layout), "eval": config.eval.to_dict()}
  finetuned = layout.marker("finetune")
  return identity | ({"finetuned": json.loads(finetuned.read_text())} if finetuned.exists() else {})
