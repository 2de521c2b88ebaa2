"""TopK and BatchTopK exports: SAELens loads each file as the class it claims (TopK; BatchTopK as a
JumpReLU and as its BatchTopK training class) and gives our outputs; the BatchTopK SAE released as a
JumpReLU keeps about k latents per token on rows it never saw; a missing threshold is named."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sae_lens import SAE as LensSAE
from sae_lens.saes.sae import TrainingSAE
from safetensors.numpy import load_file, save_file

import scope_jax as sj
from scope_jax.config import default_config
from scope_jax.data import ArraySource
from scope_jax.export import export
from scope_jax.parallel.mesh import make_mesh
from scope_jax.sae.topk import as_float, kth_largest_bits, relu_bits
from scope_jax.train import train

D, K = 32, 8


def _rows(n, seed):
  """Rows of one distribution (an offset and uneven scales, so folding the normalization has work
  to do); `seed` draws the rows."""
  shape = np.random.default_rng(0)
  scale_d, offset_d = shape.uniform(0.5, 2, D), shape.normal(0, 2, D)
  return (np.random.default_rng(seed).normal(size=(n, D)) * scale_d + offset_d).astype(np.float32)


@pytest.fixture(scope="module", params=["topk", "batchtopk"])
def exported(request, tmp_path_factory):
  activation = request.param
  c = default_config()
  c.sweep.activation, c.sweep.widths, c.sweep.k = activation, (64, 128), (K,)
  c.train.batch_size, c.train.steps, c.train.log_every, c.export.batches = 256, 600, 100, 8
  c.recipe.lr, c.recipe.lr_warmup_steps = 3e-3, 20
  workdir = tmp_path_factory.mktemp(activation)
  # one device: the trainer on a 4x2 CPU mesh hangs in XLA:CPU about once in 1,500 steps (JumpReLU too;
  # not this test's subject); the sharded TopK step is tested in tests/train/test_topk.py
  source = ArraySource(_rows(40_000, 0), 256, make_mesh(devices=jax.devices()[:1]))
  train(c, workdir, source, progress=False)
  return activation, export(c, workdir, source, progress=False)


def _batch_topk(pre_bm, kept):
  """BatchTopK's latents: the `kept` largest ReLU'd values of the whole batch (sae/topk.py's bisection)."""
  bits_bm = relu_bits(pre_bm)
  tau = as_float(kth_largest_bits(lambda t: jnp.sum(bits_bm >= t), (), kept))
  return np.asarray(jnp.where((pre_bm >= tau) & (pre_bm > 0), pre_bm, 0.0))


def _encode_decode(lens, x):
  with torch.no_grad():
    f = lens.encode(torch.tensor(x))
    return f.numpy(), lens.decode(f).numpy()


def test_saelens_loads_each_export_as_the_class_it_claims_and_gives_our_outputs(exported):
  activation, entries = exported
  x = _rows(64, 7)
  for e in entries:
    ours = sj.load_sae(e.sae_file)
    f_ours = np.asarray(ours.encode(x))
    assert 0 < np.mean(f_ours > 0) < 0.5, e.name
    if activation == "topk":
      assert set(e.files) == {"saelens"} and e.k == K and e.l1_coefficient is None
      assert ours.info.activation == "topk" and ours.info.k == K
      np.testing.assert_array_equal(np.sum(f_ours > 0, axis=-1), K)  # K latents per token, exactly
    else:
      assert set(e.files) == {"gemma_scope", "gemma_scope_2", "int8", "saelens", "saelens_batchtopk"}
      assert ours.info.activation == "jumprelu" and np.unique(np.asarray(ours.threshold)).size == 1
    lens = LensSAE.load_from_disk(e.files["saelens"], device="cpu")
    assert type(lens).__name__ == ("TopKSAE" if activation == "topk" else "JumpReLUSAE"), e.name
    f_lens, xhat_lens = _encode_decode(lens, x)
    np.testing.assert_allclose(f_lens, f_ours, rtol=1e-5, atol=1e-5, err_msg=e.name)
    np.testing.assert_allclose(xhat_lens, np.asarray(ours(x)), rtol=1e-4, atol=1e-4, err_msg=e.name)
    if activation == "batchtopk":
      trainer = TrainingSAE.load_from_disk(e.files["saelens_batchtopk"], device="cpu")
      assert type(trainer).__name__ == "BatchTopKTrainingSAE" and trainer.cfg.k == K, e.name
      assert float(trainer.topk_threshold) == pytest.approx(float(ours.threshold[0]), rel=1e-6)
      with torch.no_grad():  # its training forward: the batch's K·64 largest ReLU'd values
        f_batch = trainer.encode(torch.tensor(x)).numpy()
      ours_batch = _batch_topk(jnp.asarray(x) @ ours.W_enc + ours.b_enc, K * len(x))
      np.testing.assert_allclose(f_batch, ours_batch, rtol=1e-5, atol=1e-5, err_msg=e.name)
      assert np.sum(f_batch > 0) == K * len(x)


def test_the_batchtopk_release_keeps_about_k_latents_per_token_on_rows_it_never_saw(exported):
  activation, entries = exported
  if activation != "batchtopk":
    pytest.skip("BatchTopK's release only: TopK keeps exactly k by construction (the test above)")
  held_out = _rows(4096, 99)
  for e in entries:
    for key in ("gemma_scope", "gemma_scope_2", "int8"):
      l0 = float(np.mean(np.sum(np.asarray(sj.load_sae(e.files[key]).encode(held_out)) > 0, axis=-1)))
      assert abs(l0 - K) <= 0.1 * K, (e.name, key, l0)
    assert abs(e.l0 - K) <= 0.1 * K, (e.name, e.l0)  # and on the export's own measuring rows


def test_a_batchtopk_file_without_its_threshold_is_refused_naming_file_and_tensor(exported, tmp_path):
  activation, entries = exported
  if activation != "batchtopk":
    pytest.skip("a TopK file holds no threshold")
  source = entries[0].files["saelens_batchtopk"]
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  tensors = load_file(f"{source}/sae_weights.safetensors")
  del tensors["topk_threshold"]
  save_file(tensors, damaged / "sae_weights.safetensors")
  shutil.copy(f"{source}/cfg.json", damaged / "cfg.json")
  with pytest.raises(ValueError, match=r"damaged/sae_weights.safetensors: missing tensors \['topk_threshold'\]"):
    sj.load_sae(damaged)
  cfg = json.loads((damaged / "cfg.json").read_text())
  (damaged / "cfg.json").write_text(json.dumps(cfg | {"k": 1000}))
  save_file(load_file(f"{source}/sae_weights.safetensors"), damaged / "sae_weights.safetensors")
  with pytest.raises(ValueError, match=r"damaged/cfg.json: k = 1000; a SAELens 'batchtopk' needs an integer k"):
    sj.load_sae(damaged)
