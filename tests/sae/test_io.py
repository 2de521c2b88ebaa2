"""Folding the normalization, Gemma Scope npz and SAELens directories (read by the real sae_lens)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sae_lens import SAE as LensSAE

import scope_jax as sj
from scope_jax.sae import SAE, SAEInfo, fold, init_sae, jumprelu, training_pre, width_name


def random_sae(d=24, m=80, seed=0) -> SAE:
  """A training-form SAE with non-trivial biases and thresholds (so folding has work to do)."""
  rng = np.random.default_rng(seed)
  sae = init_sae(jax.random.key(seed), d, m)
  return sae.replace(
    b_enc=jnp.asarray(rng.normal(0, 0.3, m), jnp.float32),
    b_dec=jnp.asarray(rng.normal(0, 0.5, d), jnp.float32),
    threshold=jnp.asarray(rng.uniform(0.05, 0.4, m), jnp.float32),
  )


def test_folded_sae_on_raw_inputs_gives_scaled_latents_and_the_same_reconstruction():
  sae, scale = random_sae(), 7.3
  x_raw = np.random.default_rng(1).normal(0, scale / np.sqrt(24), (50, 24)).astype(np.float32)
  f_train = jumprelu(training_pre(sae, x_raw / scale), sae.threshold, 0.001)
  xhat_train = f_train @ sae.W_dec + sae.b_dec
  assert 0.2 < float(jnp.mean(f_train > 0)) < 0.8
  released = fold(sae, scale)
  np.testing.assert_allclose(released.encode(x_raw), scale * f_train, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(released(x_raw), scale * xhat_train, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(released.W_enc, sae.W_enc)


def test_saelens_loads_our_export_with_the_same_encode_and_decode(tmp_path):
  sae = fold(random_sae(), 3.0).replace(info=SAEInfo(site="res.6", model="gemma3-270m", context_size=128))
  density = np.log10(np.random.default_rng(0).uniform(1e-4, 1, sae.width))
  path = sj.save_sae(sae, tmp_path / "lens", format="saelens", sparsity_log10=density)
  lens = LensSAE.load_from_disk(str(path), device="cpu")
  assert lens.cfg.metadata.hook_name == "blocks.6.hook_resid_post"
  assert lens.cfg.metadata.context_size == 128
  x = np.random.default_rng(2).normal(0, 1, (40, sae.d_in)).astype(np.float32)
  with torch.no_grad():
    f_lens = lens.encode(torch.tensor(x)).numpy()
    xhat_lens = lens.decode(torch.tensor(f_lens)).numpy()
  assert 0 < (f_lens > 0).mean() < 1
  np.testing.assert_allclose(sae.encode(x), f_lens, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae.decode(f_lens), xhat_lens, rtol=1e-5, atol=1e-5)
  back = sj.load_sae(path)
  assert back.info.site == "res.6" and back.info.context_size == 128
  np.testing.assert_array_equal(back.W_dec, sae.W_dec)


def test_saelens_training_layout_with_b_dec_on_input_is_converted(tmp_path):
  sae = random_sae(seed=3)
  path = sj.save_sae(sae, tmp_path / "lens", format="saelens")
  cfg = json.loads((path / "cfg.json").read_text())
  (path / "cfg.json").write_text(json.dumps(cfg | {"apply_b_dec_to_input": True}))
  lens = LensSAE.load_from_disk(str(path), device="cpu")
  x = np.random.default_rng(4).normal(0, 1, (30, sae.d_in)).astype(np.float32)
  with torch.no_grad():
    f_lens = lens.encode(torch.tensor(x)).numpy()
  np.testing.assert_allclose(sj.load_sae(path).encode(x), f_lens, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lowercase", [False, True])
def test_official_gemma_scope_npz_matches_the_reference_formula(tmp_path, lowercase):
  rng = np.random.default_rng(5)
  d, m = 16, 48
  arrays = {
    "W_enc": rng.normal(0, 0.3, (d, m)),
    "W_dec": rng.normal(0, 0.3, (m, d)),
    "b_enc": rng.normal(0, 0.1, m),
    "b_dec": rng.normal(0, 0.1, d),
    "threshold": rng.uniform(0, 0.5, m),
  }
  arrays = {(k.lower() if lowercase else k): v.astype(np.float32) for k, v in arrays.items()}
  path = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82" / "params.npz"
  path.parent.mkdir(parents=True)
  np.savez(path, **arrays)
  sae = sj.load_sae(path.parent)
  assert sae.info.site == "res.12"
  a = {k.lower(): v for k, v in arrays.items()}
  x = rng.normal(0, 1, (20, d)).astype(np.float32)
  pre = x @ a["w_enc"] + a["b_enc"]
  f = (pre > a["threshold"]) * np.maximum(pre, 0)
  np.testing.assert_allclose(sae.encode(x), f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae(x), f @ a["w_dec"] + a["b_dec"], rtol=1e-5, atol=1e-5)


def test_gemma_scope_export_round_trip(tmp_path):
  sae = fold(random_sae(), 2.0)
  path = sj.save_sae(sae, tmp_path / "res" / "layer_3" / "width_80" / "average_l0_9", format="gemma-scope")
  back = sj.load_sae(path)
  assert back.info.site == "res.3"
  for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
    np.testing.assert_array_equal(getattr(back, k), getattr(sae, k))


def test_width_names_follow_the_hub():
  assert [width_name(2**k) for k in (14, 15, 16, 17, 18, 19, 20)] == ["16k", "32k", "65k", "131k", "262k", "524k", "1m"]


def test_bad_sae_files_are_clear_errors(tmp_path):
  np.savez(tmp_path / "params.npz", W_enc=np.zeros((4, 8)), W_dec=np.zeros((8, 4)))
  with pytest.raises(ValueError, match=r"params.npz: missing \['b_enc', 'b_dec', 'threshold'\]"):
    sj.load_sae(tmp_path / "params.npz")
  np.savez(
    tmp_path / "bad.npz",
    W_enc=np.zeros((4, 8)),
    W_dec=np.zeros((8, 5)),
    b_enc=np.zeros(8),
    b_dec=np.zeros(4),
    threshold=np.zeros(8),
  )
  with pytest.raises(ValueError, match=r"bad.npz: W_dec has shape \(8, 5\); expected \(8, 4\)"):
    sj.load_sae(tmp_path / "bad.npz")
  with pytest.raises(FileNotFoundError, match="not an SAE"):
    sj.load_sae(tmp_path / "nothing-here")
  lens = sj.save_sae(random_sae(), tmp_path / "lens", format="saelens")
  cfg = json.loads((lens / "cfg.json").read_text())
  (lens / "cfg.json").write_text(json.dumps(cfg | {"architecture": "gated"}))
  with pytest.raises(ValueError, match="architecture 'gated'"):
    sj.load_sae(lens)
  (lens / "cfg.json").write_text(json.dumps(cfg | {"architecture": "topk", "k": 0}))
  with pytest.raises(ValueError, match=r"cfg.json: k = 0; a SAELens 'topk' needs an integer k in \[1, 80\)"):
    sj.load_sae(lens)
  with pytest.raises(ValueError, match="format 'hf'"):
    sj.save_sae(random_sae(), tmp_path / "x", format="hf")


def test_damaged_or_impossible_sae_files_are_refused_naming_the_file(tmp_path):
  good = sj.save_sae(random_sae(), tmp_path / "good.npz")
  (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[:200])
  with pytest.raises(ValueError, match=r"truncated.npz: not a readable .npz file \(BadZipFile"):
    sj.load_sae(tmp_path / "truncated.npz")
  arrays = random_sae().numpy()
  np.savez(tmp_path / "nan.npz", **(arrays | {"W_dec": np.where(np.eye(80, 24) > 0, np.nan, arrays["W_dec"])}))
  with pytest.raises(ValueError, match=r"nan.npz: W_dec holds 24 NaN or Inf values; expected finite weights"):
    sj.load_sae(tmp_path / "nan.npz")
  np.savez(tmp_path / "negative.npz", **(arrays | {"threshold": -arrays["threshold"]}))
  with pytest.raises(ValueError, match=r"negative.npz: threshold holds 80 negative values; expected thresholds >= 0"):
    sj.load_sae(tmp_path / "negative.npz")

  lens = sj.save_sae(random_sae(), tmp_path / "lens", format="saelens")
  cfg = json.loads((lens / "cfg.json").read_text())
  (lens / "cfg.json").write_text(json.dumps(cfg | {"d_sae": 4096}))
  with pytest.raises(ValueError, match=r"lens/cfg.json: d_sae = 4096, but the weights have d_sae 80"):
    sj.load_sae(lens)
  (lens / "cfg.json").write_text('{"architecture": "jumprelu",')
  with pytest.raises(ValueError, match=r"lens/cfg.json: not valid JSON"):
    sj.load_sae(lens)


def test_a_saelens_directory_is_replaced_whole(tmp_path):
  density = np.full(80, -2.0, np.float32)
  lens = sj.save_sae(random_sae(seed=1), tmp_path / "lens", format="saelens", sparsity_log10=density)
  assert (lens / "sparsity.safetensors").exists()
  sj.save_sae(random_sae(seed=2), lens, format="saelens")  # no densities this time
  assert sorted(p.name for p in lens.iterdir()) == [".scope_jax.json", "cfg.json", "sae_weights.safetensors"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]  # no staging or retired folder left
  np.testing.assert_array_equal(sj.load_sae(lens).W_enc, random_sae(seed=2).W_enc)


def _npz_declaring(path, arrays: dict, name: str, shape: str) -> None:
  """An npz whose member `name` keeps its bytes but declares `shape` in its npy header."""
  import io
  import zipfile

  with zipfile.ZipFile(path, "w") as z:
    for key, value in arrays.items():
      buffer = io.BytesIO()
      np.save(buffer, value)
      raw = buffer.getvalue()
      if key == name:  # the new shape takes some of the header's padding spaces
        raw = raw.replace(str(value.shape).encode(), shape.encode(), 1)
      z.writestr(f"{key}.npy", raw)


def test_an_npz_declaring_a_huge_shape_is_refused_before_allocating_naming_file_array_and_shape(tmp_path):
  arrays = random_sae().numpy()
  _npz_declaring(tmp_path / "huge.npz", arrays, "W_enc", "(99999999, 999999)")
  with pytest.raises(ValueError, match=r"huge.npz: array W_enc declares shape \(99999999, 999999\) of float32 "):
    sj.load_sae(tmp_path / "huge.npz")
  _npz_declaring(tmp_path / "short.npz", arrays, "b_dec", "(25,)")  # one element more than it holds
  with pytest.raises(ValueError, match=r"short.npz: array b_dec declares shape \(25,\) of float32 \(100 bytes\), but"):
    sj.load_sae(tmp_path / "short.npz")


def _safetensors_with_header(path, header: dict, data: bytes) -> None:
  raw = json.dumps(header).encode()
  path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("fmt", ["saelens", "gemma-scope-2", "int8"])
def test_safetensors_declaring_more_than_they_hold_are_refused_naming_file_tensor_and_shape(tmp_path, fmt):
  folder = sj.save_sae(random_sae(), tmp_path / "sae", format=fmt)
  file = next(p for p in folder.iterdir() if p.suffix == ".safetensors" and "sparsity" not in p.name)
  raw = file.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
  name = next(k for k in header if k.lower() == "w_enc")
  huge = header | {name: header[name] | {"shape": [2**31, 2**20]}}
  _safetensors_with_header(file, huge, data)
  with pytest.raises(ValueError, match=rf"{file}: tensor {name} declares shape \(2147483648, 1048576\) of "):
    sj.load_sae(folder)
  _safetensors_with_header(file, {"__metadata__": {}}, b"")
  file.write_bytes((10**15).to_bytes(8, "little") + b"{}")  # a header length beyond the file
  with pytest.raises(ValueError, match=rf"{file}: header declares 1,000,000,000,000,000 bytes; the file holds 10"):
    sj.load_sae(folder)
