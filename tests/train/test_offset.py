"""Activations with a large constant offset (Gemma 3's residual stream): b_dec starts at the
data's mean, C follows `recipe.normalize`, export folds both back, and a planted dictionary is
still recovered under the offset."""

import json

import jax
import numpy as np
import pytest

import scope_jax as sj
from scope_jax.config import default_config
from scope_jax.data import ArraySource
from scope_jax.data.loader import StoreLoader
from scope_jax.export.exporter import export
from scope_jax.parallel.mesh import make_mesh
from scope_jax.sae import training_pre, unstack
from scope_jax.train import train
from tests.data.stores import SITE, write_store
from tests.train.test_step import planted_dictionary


def _offset_rows(n=4_000, d=32, seed=0):
  """Rows whose mean carries ~90% of E||x||², concentrated in three dimensions."""
  rng = np.random.default_rng(seed)
  offset = np.zeros(d)
  offset[[3, 11, 20]] = [9.0, -7.0, 5.0]
  return (rng.normal(size=(n, d)) * rng.uniform(0.3, 1.5, d) + offset).astype(np.float32)


def _config(steps, normalize="centred", widths=(64,), lambdas=(1e-3,)):
  c = default_config()
  c.sweep.widths, c.sweep.l1_coefficients = tuple(widths), tuple(lambdas)
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 256, steps, 5, 10**6
  c.recipe.lr, c.recipe.lr_warmup_steps, c.recipe.sparsity_warmup_steps = 3e-3, 5, 10
  c.recipe.bandwidth, c.recipe.normalize = 0.05, normalize
  c.export.batches = 2
  return c


@pytest.mark.parametrize("normalize", ["centred", "raw"])
def test_b_dec_starts_at_the_data_mean_and_c_follows_recipe_normalize(tmp_path, normalize):
  x = _offset_rows().astype(np.float64)
  mean = x.mean(0)
  expected_c = np.sqrt(np.mean(np.sum((x - mean) ** 2, 1)) if normalize == "centred" else np.mean(np.sum(x**2, 1)))
  mesh = make_mesh(devices=jax.devices()[:1])
  source = ArraySource(x.astype(np.float32), 256, mesh, normalize=normalize)
  assert source.scale == pytest.approx(expected_c, rel=1e-6)
  state = train(_config(0, normalize), tmp_path, source, progress=False)  # step 0: the initial state
  np.testing.assert_allclose(np.asarray(state["params"][0].b_dec)[0], mean / expected_c, rtol=1e-5, atol=1e-6)


def test_b_dec_starts_at_the_mean_in_a_stores_manifest(tmp_path):
  write_store(tmp_path / "store")
  # the rows write_store wrote: column 0 the global id, column 1 its document, the rest normal
  ids = np.arange(1_700)
  rows = np.zeros((1_700, 8))
  rows[:, 0], rows[:, 1] = ids, ids // 50
  rows[:1_000, 2:] = np.random.default_rng(0).normal(size=(1_000, 6))
  rows[1_000:, 2:] = np.random.default_rng(1).normal(size=(700, 6))
  mean = rows.mean(0)
  c = _config(0)
  c.site, c.data.path = SITE, str(tmp_path / "store")
  state = train(c, tmp_path / "w", progress=False)
  scale = np.sqrt(np.mean(np.sum((rows - mean) ** 2, 1)))
  np.testing.assert_allclose(np.asarray(state["params"][0].b_dec)[0], mean / scale, rtol=1e-5)
  loader = StoreLoader(str(tmp_path / "store"), SITE, 64, make_mesh(), normalize="centred")
  assert loader.scale == pytest.approx(scale, rel=1e-6)
  loader.close()


def test_a_normalize_that_is_not_raw_or_centred_is_a_clear_error(tmp_path):
  c = _config(1, normalize="center")
  with pytest.raises(ValueError, match=r"recipe.normalize 'center': expected one of \('raw', 'centred'\)"):
    train(c, tmp_path, ArraySource(_offset_rows(), 256, make_mesh()), progress=False)
  with pytest.raises(ValueError, match=r"recipe.normalize 'mean'"):
    ArraySource(_offset_rows(), 256, make_mesh(), normalize="mean")


def test_centred_export_on_raw_inputs_gives_c_times_the_training_latents_and_the_same_reconstruction(tmp_path):
  x = _offset_rows()
  np.save(tmp_path / "x.npy", x)
  c = _config(30, "centred", lambdas=(1e-3, 1e-2))
  c.data.path = str(tmp_path / "x.npy")
  state = train(c, tmp_path, progress=False)
  entries = export(c, tmp_path, progress=False)
  source = ArraySource(x, 256, make_mesh(), normalize="centred")
  scale = entries[0].scale
  assert scale == pytest.approx(source.scale) and scale < 0.5 * np.sqrt(np.mean(np.sum(x**2, 1)))
  xn = x[:512] / scale
  for entry, sae in zip(entries, unstack(jax.device_get(state["params"][0]).to_sae())):
    pre = np.asarray(training_pre(sae, xn))
    f_train = np.where(pre > np.asarray(sae.threshold), pre, 0.0)
    recon_train = f_train @ np.asarray(sae.W_dec) + np.asarray(sae.b_dec)
    assert 0 < np.mean(f_train > 0) < 1
    released = sj.load_sae(entry.files["gemma_scope"])
    f_raw = np.asarray(released.encode(x[:512]))
    np.testing.assert_allclose(f_raw, scale * f_train, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(np.asarray(released(x[:512])), scale * recon_train, rtol=1e-4, atol=1e-3)
  assert json.loads((tmp_path / "export" / "index.json").read_text())[0]["scale"] == scale


def test_a_planted_dictionary_is_recovered_under_a_large_constant_offset(tmp_path):
  directions, signal = planted_dictionary()
  offset = np.zeros(directions.shape[1])
  offset[[5, 17, 40]] = [12.0, 9.0, -6.0]  # ||offset||² ≈ 7× E||signal||², as at res.6 of Gemma 3 270M
  x = (signal + offset).astype(np.float32)
  assert np.sum(offset**2) > 0.85 * np.mean(np.sum(x.astype(np.float64) ** 2, 1))
  mesh = make_mesh(devices=jax.devices()[:1])
  c = default_config()
  c.sweep.widths, c.sweep.l1_coefficients = [128], [3e-2, 1e-1]
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 512, 2500, 500, 10**6
  c.recipe.lr, c.recipe.lr_warmup_steps, c.recipe.sparsity_warmup_steps = 3e-3, 50, 200
  state = train(c, tmp_path, ArraySource(x, 512, mesh, seed=0, normalize="centred"), progress=False)
  W_dec = np.asarray(state["params"][0].W_dec)  # [λ, M, d]
  recovered = [float(np.mean((directions @ w.T).max(axis=1) >= 0.9)) for w in W_dec]
  assert max(recovered) >= 0.9, recovered
