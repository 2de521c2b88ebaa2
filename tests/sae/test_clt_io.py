"""A CLT's files (sae/clt_io.py): both layouts read back exactly, SAELens's Gemma 3 loader reads a
layer of ours, a transcoder set round-trips, and damaged files are errors naming the file."""

import jax
import numpy as np
import pytest

from scope_jax.sae.clt import CLTInfo, fold, forward, init_clt, unfold
from scope_jax.sae.clt_io import (
  load_clt,
  load_replacement,
  save_circuit_tracer,
  save_gemma_scope_2_clt,
  save_transcoder_set,
)
from scope_jax.sae.model import SAEInfo, init_transcoder

L, D, F = 4, 24, 40
INFO = CLTInfo("gemma3-270m", 0, L, 3e-4)


def random_clt(seed=0):
  rng = np.random.default_rng(seed)
  clt = init_clt(jax.random.key(seed), L, D, D, F, 0.1, rng.normal(size=(L, D)))
  return jax.tree.map(np.asarray, clt).replace(b_enc=rng.normal(size=(L, F)).astype(np.float32))


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("save", [save_circuit_tracer, save_gemma_scope_2_clt], ids=["circuit-tracer", "gemma-scope-2"])
def test_both_layouts_read_back_exactly(tmp_path, save):
  clt = random_clt()
  back, info = load_clt(save(clt, INFO, tmp_path / "clt"))
  assert_same(back, clt)
  assert (info.first_layer, info.layers, info.model, info.l1_coefficient) == (0, L, "gemma3-270m", 3e-4)


def test_fold_keeps_the_function_on_raw_activations():
  clt = random_clt()
  cx, cy = np.array([2.0, 3.0, 0.5, 1.5]), np.array([4.0, 1.0, 2.5, 0.8])
  x = np.random.default_rng(1).normal(size=(L, 7, D)).astype(np.float32)
  released = fold(clt, cx, cy)
  want = forward(clt, x) * cy[:, None, None]
  np.testing.assert_allclose(forward(released, x * cx[:, None, None]), want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(unfold(released, cx, cy)), jax.tree.leaves(clt), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_saelens_gemma_3_loader_reads_a_layer_of_ours(tmp_path, monkeypatch):
  """SAELens's own loader on our Gemma Scope 2 layout (its downloads pointed at the local files):
  layer 1's latents with their decoders summed over the layers they write to, as it loads Gemma
  Scope 2's CLTs."""
  from sae_lens.loading import pretrained_sae_loaders as loaders
  from safetensors.numpy import load_file

  clt = random_clt()
  root = tmp_path / "gemma-scope-2-270m-pt"
  save_gemma_scope_2_clt(clt, INFO, root / "clt" / "width_40_l0_10")

  def local(repo_id, filename=None, subfolder=None, **_):  # the hub's answers, from the local folder
    path = root / (f"{subfolder}/{filename}" if subfolder else filename)
    if not path.exists():
      raise loaders.EntryNotFoundError(f"{filename} is not in {repo_id}")
    return str(path)

  monkeypatch.setattr(loaders, "hf_hub_download", local)
  shapes = lambda repo_id, filename, **_: {k: list(v.shape) for k, v in load_file(root / filename).items()}
  monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)
  folder = "clt/width_40_l0_10/params_layer_1"
  cfg, state, _ = loaders.gemma_3_sae_huggingface_loader("google/gemma-scope-2-270m-pt", folder)
  assert cfg["architecture"] == "jumprelu_transcoder" and (cfg["d_in"], cfg["d_sae"], cfg["d_out"]) == (D, F, D)
  assert cfg["hook_name"] == "blocks.1.hook_mlp_in" and cfg["hf_hook_name_out"].endswith(
    "layers.1.post_feedforward_layernorm.output"
  )
  np.testing.assert_array_equal(state["W_enc"].numpy(), clt.W_enc[1])
  np.testing.assert_allclose(state["W_dec"].numpy(), clt.W_dec[1].sum(axis=1), rtol=1e-6)
  for ours, theirs in (("b_enc", "b_enc"), ("threshold", "threshold"), ("b_dec", "b_dec")):
    np.testing.assert_array_equal(state[theirs].numpy(), getattr(clt, ours)[1])


def test_a_transcoder_set_round_trips_as_a_clt_writing_each_layer_only(tmp_path):
  saes = []
  for layer in range(3):
    t = init_transcoder(jax.random.key(layer), D, D, F, 0.2, np.full(D, layer, np.float32))
    saes.append(jax.tree.map(np.asarray, t).replace(info=SAEInfo(site=f"mlp_in.{layer}", target_site=f"mlp.{layer}")))
  path = save_transcoder_set(saes, "gemma3-270m", tmp_path / "set")
  clt, info, kind = load_replacement(path)
  assert kind == "transcoder_set" and (info.first_layer, info.layers) == (0, 3)
  for layer, t in enumerate(saes):
    np.testing.assert_array_equal(clt.W_enc[layer], t.W_enc)
    np.testing.assert_array_equal(clt.W_dec[layer][:, 0], t.W_dec)
    np.testing.assert_array_equal(clt.b_dec[layer], t.b_dec)
  with pytest.raises(
    ValueError, match=r"transcoder 1 reads mlp_in.2 and writes mlp.2; a transcoder set needs mlp_in.1"
  ):
    save_transcoder_set([saes[0], saes[2]], "gemma3-270m", tmp_path / "gap")


def test_damaged_clt_files_are_errors_naming_the_file(tmp_path):
  from safetensors.numpy import save_file

  clt = random_clt()
  ct = save_circuit_tracer(clt, INFO, tmp_path / "ct")
  save_file({"W_dec_2": np.zeros((F, 3, D), np.float32)}, str(ct / "W_dec_2.safetensors"))
  with pytest.raises(
    ValueError, match=r"W_dec_2.safetensors: W_dec_2 has shape \(40, 3, 24\); expected \[d_sae, 2, d_model\]"
  ):
    load_clt(ct)
  (ct / "W_dec_2.safetensors").unlink()
  with pytest.raises(ValueError, match=r"W_dec_2.safetensors: missing"):
    load_clt(ct)
  (ct / "W_enc_2.safetensors").unlink()
  with pytest.raises(ValueError, match=r"W_enc files for layers \[0, 1, 3\]; expected W_enc_0"):
    load_clt(ct)
  gs2 = save_gemma_scope_2_clt(clt, INFO, tmp_path / "gs2")
  (gs2 / "params_layer_3.safetensors").unlink()  # three files left, each w_dec still written for four layers
  with pytest.raises(
    ValueError, match=r"params_layer_0.safetensors: w_dec has shape \(40, 4, 24\); expected \[d_sae, 3"
  ):
    load_clt(gs2)
  with pytest.raises(ValueError, match=r"not a CLT directory"):
    load_clt(tmp_path)
  with pytest.raises(
    ValueError, match=r"circuit-tracer replaces every MLP of the model from layer 0; this CLT starts at"
  ):
    save_circuit_tracer(clt, CLTInfo("gemma3-270m", 2, L), tmp_path / "late")
