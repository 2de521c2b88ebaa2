import numpy as np
import pytest

from scope_jax.config import default_config
from scope_jax.data import ArraySource
from scope_jax.export import export
from scope_jax.parallel.mesh import make_mesh
from scope_jax.train import stacked, train


def test_export_restores_the_checkpoint_without_building_a_step_or_checking_memory(tmp_path, monkeypatch):
  c = default_config()
  c.sweep.widths, c.sweep.l1_coefficients = (32,), (1e-3, 1e-2)
  c.train.batch_size, c.train.steps, c.export.batches = 64, 10, 2
  source = ArraySource(np.random.default_rng(0).normal(size=(1024, 16)).astype(np.float32), 64, make_mesh(4, 2))
  state = train(c, tmp_path, source, progress=False)

  def refused(*args, **kwargs):
    raise AssertionError("export built a training step")

  monkeypatch.setattr(stacked, "make_train_step", refused)
  monkeypatch.setattr("scope_jax.train.run.check_fits", refused)
  entries = export(c, tmp_path, source, progress=False)
  assert [e.name for e in entries] == ["w32-l0.001-s0", "w32-l0.01-s0"] and {e.step for e in entries} == {10}
  assert entries[0].input_site is None and entries[0].output_site is None  # a .npy-like source names no site
  assert int(state["step"]) == 10


def test_export_of_a_workdir_without_checkpoints_says_to_train_first(tmp_path):
  c = default_config()
  c.sweep.widths, c.train.batch_size = (32,), 64
  source = ArraySource(np.zeros((256, 16), np.float32) + 1.0, 64, make_mesh(4, 2))
  with pytest.raises(FileNotFoundError, match="no checkpoint to export; run `scope-jax train` first"):
    export(c, tmp_path, source, progress=False)
