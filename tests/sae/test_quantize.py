"""Quantized SAE weights: the rounding each format promises, and the int8 files read back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import scope_jax as sj
from scope_jax.sae import SAE
from scope_jax.sae.model import SAEInfo
from scope_jax.sae.quantize import QUANTIZED, quantized


def sae(d=32, m=96, seed=0) -> SAE:
  k = jax.random.split(jax.random.key(seed), 4)
  scales = jnp.logspace(-4, 1, m)  # latents whose weights differ by 10^5: one scale would crush the small ones
  return SAE(
    W_enc=jax.random.normal(k[0], (d, m)) * scales,
    b_enc=jax.random.normal(k[1], (m,)),
    W_dec=jax.random.normal(k[2], (m, d)) * scales[:, None],
    b_dec=jax.random.normal(k[3], (d,)),
    threshold=jnp.full((m,), 0.1),
    info=SAEInfo(site="res.3", model="google/gemma-3-270m"),
  )


@pytest.mark.parametrize("fmt, rel", [("bfloat16", 2**-8), ("float8_e4m3", 2**-3), ("int8", None)])
def test_each_format_rounds_every_latent_within_its_precision(fmt, rel):
  s = sae()
  q = quantized(s, fmt)
  for name, axis in (("W_enc", 0), ("W_dec", 1)):
    w, wq = np.asarray(getattr(s, name)), np.asarray(getattr(q, name))
    largest = np.max(np.abs(w), axis=axis, keepdims=True)
    if fmt == "int8":  # half a step of the latent's own scale
      assert np.all(np.abs(wq - w) <= largest / 127 / 2 * (1 + 1e-6))
    else:  # relative to the value, for values far from the latent's underflow
      big = np.abs(w) > largest * 2**-6
      assert np.all(np.abs(wq - w)[big] <= rel * np.abs(w)[big])
    assert not np.array_equal(wq, w)
    np.testing.assert_array_equal(np.asarray(getattr(quantized(q, fmt), name)), wq)  # rounding twice changes nothing
  for name in ("b_enc", "b_dec", "threshold"):
    np.testing.assert_array_equal(np.asarray(getattr(q, name)), np.asarray(getattr(s, name)))
  with pytest.raises(ValueError, match=r"quantization 'int4': expected one of \('bfloat16', 'float8_e4m3', 'int8'\)"):
    quantized(s, "int4")
  assert fmt in QUANTIZED


def test_the_int8_export_is_int8_with_scales_and_reads_back_as_the_int8_sae(tmp_path):
  s = sae()
  folder = sj.save_sae(s, tmp_path / "int8", format="int8")
  raw = load_file(str(folder / "params_int8.safetensors"))
  assert raw["w_enc"].dtype == np.int8 and raw["w_dec"].dtype == np.int8
  assert raw["w_enc_scale"].shape == raw["w_dec_scale"].shape == (96,)
  back = sj.load_sae(folder)
  expected = quantized(s, "int8")
  for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
    np.testing.assert_array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(expected, name)), err_msg=name)
  assert back.info.site == "res.3" and back.info.model == "google/gemma-3-270m"
  x = jax.random.normal(jax.random.key(5), (64, 32))
  np.testing.assert_allclose(np.asarray(back(x)), np.asarray(expected(x)), rtol=1e-6, atol=1e-6)
  raw["w_dec"] = raw["w_dec"].astype(np.float32)
  from safetensors.numpy import save_file

  save_file(raw, str(folder / "params_int8.safetensors"))
  with pytest.raises(ValueError, match="w_enc and w_dec must be int8"):
    sj.load_sae(folder)
