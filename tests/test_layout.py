"""The run's layout and its stage markers: a finished stage is told by the identity it was made from,
never by modification times."""

import json
import os

import numpy as np
import pytest

from scope_jax.config import default_config
from scope_jax.data import ArraySource
from scope_jax.export import export
from scope_jax.grid import Job, is_finished
from scope_jax.layout import OWNER_FILE, RunLayout, differences, eval_identity, export_identity
from scope_jax.parallel.mesh import make_mesh
from scope_jax.train import train


def test_differences_name_every_changed_leaf():
  old = {"a": 1, "b": {"c": [1, 2], "d": "x"}}
  assert differences(old, {"a": 1, "b": {"c": [1, 2], "d": "x"}}) == []
  assert differences(old, {"a": 2, "b": {"c": (1, 3), "e": 0}}) == [
    "a: 1 -> 2",
    "b.c: [1, 2] -> [1, 3]",
    "b.d: 'x' -> None",
    "b.e: None -> 0",
  ]


def test_a_marker_holds_its_identity_and_is_replaced_atomically(tmp_path):
  layout = RunLayout(tmp_path)
  assert not layout.finished("export", {"checkpoint": 10})
  layout.mark_finished("export", {"checkpoint": 10})
  assert layout.finished("export", {"checkpoint": 10})
  assert not layout.finished("export", {"checkpoint": 20})
  layout.mark_finished("export", {"checkpoint": 20})
  assert layout.finished("export", {"checkpoint": 20}) and not list(layout.marker("export").parent.glob("*.tmp"))
  layout.unmark("export")
  assert not layout.finished("export", {"checkpoint": 20})
  with pytest.raises(ValueError, match="stage 'train': expected one of"):
    layout.marker("train")


def _config(steps):
  c = default_config()
  c.sweep.widths, c.sweep.l1_coefficients = [32], [1e-3]
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 64, steps, 5, 10
  c.export.batches = 2
  c.browse.enabled = False  # a trainer job is finished at its eval here (no store to browse)
  return c


def _set_times(root, seconds):
  for path in [root, *root.rglob("*")]:
    os.utime(path, (seconds, seconds))


def test_finished_stages_are_told_by_their_markers_whatever_the_file_times(tmp_path):
  mesh = make_mesh(data=4, model=2)
  source = ArraySource(np.random.default_rng(0).normal(size=(1024, 16)).astype(np.float32), 64, mesh)
  layout = RunLayout(tmp_path)
  train(_config(10), tmp_path, source, progress=False)
  assert not layout.finished("export", export_identity(_config(10), layout))
  export(_config(10), tmp_path, source, progress=False)
  assert layout.finished("export", export_identity(_config(10), layout))

  # The export looks older than the checkpoints it was made from, then newer: nothing changes.
  _set_times(layout.export, 1_000)
  _set_times(layout.checkpoints, 2_000_000_000)
  assert layout.finished("export", export_identity(_config(10), layout))
  _set_times(layout.export, 2_100_000_000)
  assert layout.finished("export", export_identity(_config(10), layout))

  other = _config(10)
  other.export.batches = 3
  assert not layout.finished("export", export_identity(other, layout))  # other export fields: to do

  train(_config(20), tmp_path, source, progress=False)  # a newer checkpoint: to do again
  _set_times(layout.checkpoints, 1_000)
  assert not layout.finished("export", export_identity(_config(20), layout))

  # Evaluation: done only when its marker names this export and these eval fields.
  job = Job("train", "train/res.6-1K", str(tmp_path), _config(20), ("res.6",), (32,), 1_000)
  assert not is_finished(job)
  export(_config(20), tmp_path, source, progress=False)
  layout.mark_finished("eval", eval_identity(_config(20), layout))
  _set_times(layout.root, 1_000)
  assert is_finished(job)
  more = _config(20)
  more.eval.sequences = 7
  assert not is_finished(Job("train", job.name, job.workdir, more, job.sites, job.widths, job.tokens))


def test_changed_stage_fields_are_refused_unless_redone_and_exports_are_replaced_whole(tmp_path):
  mesh = make_mesh(data=4, model=2)
  source = ArraySource(np.random.default_rng(0).normal(size=(1024, 16)).astype(np.float32), 64, mesh)
  layout = RunLayout(tmp_path)
  train(_config(10), tmp_path, source, progress=False)
  assert layout.to_do("export", export_identity(_config(10), layout))  # never exported
  export(_config(10), tmp_path, source, progress=False)
  assert not layout.to_do("export", export_identity(_config(10), layout))
  old_files = {p for p in layout.export.rglob("*") if p.is_file()}

  other = _config(10)
  other.export.batches = 3
  with pytest.raises(ValueError, match=r"export in .* was made with other export fields:\n  export.batches: 2 -> 3"):
    layout.to_do("export", export_identity(other, layout))
  assert layout.to_do("export", export_identity(other, layout), redo=("export",))
  more = _config(10)
  more.eval.sequences = 7
  layout.mark_finished("eval", eval_identity(_config(10), layout))
  with pytest.raises(ValueError, match=r"eval.sequences: .* -> 7\nadd --redo=eval to replace it"):
    layout.to_do("eval", eval_identity(more, layout))

  train(_config(20), tmp_path, source, progress=False)  # only the input changed: export again, no question
  assert layout.to_do("export", export_identity(_config(20), layout))
  export(_config(20), tmp_path, source, progress=False)
  index = json.loads(layout.export_index.read_text())
  indexed = {p for e in index for p in (e["gemma_scope"], e["gemma_scope_2"], e["saelens"], e["int8"])}
  files = [p for p in layout.export.rglob("*") if p.is_file() and p != layout.export_index and p.name != OWNER_FILE]
  assert files and all(any(str(f).startswith(i) for i in indexed) for f in files)  # nothing outside the index
  assert old_files - set(files), "the test needs exports whose L0 moved between steps 10 and 20"
  assert not list(tmp_path.glob("export.*")) and not list(tmp_path.glob(".export.*"))  # no staging left
