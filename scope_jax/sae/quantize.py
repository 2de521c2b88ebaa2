"""SAE weights stored in fewer bits (Gemma Scope §5: "how much can SAEs be quantized?").

The encoder and decoder matrices, which grow with the width, are rounded to the format and read
back as float32; biases, thresholds and a skip-transcoder's `W_skip` stay float32. float8 (e4m3)
and int8 take one scale per latent (its encoder column, its decoder row: the largest magnitude
maps to the format's largest finite value, 448 or 127), so no latent's weights underflow for
another's sake; bfloat16 needs no scale (its exponent range is float32's).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from scope_jax.sae.model import SAE

QUANTIZED = ("bfloat16", "float8_e4m3", "int8")
_LARGEST = {"float8_e4m3": 448.0, "int8": 127.0}


def int8_per_latent(w: np.ndarray, latent_axis: int) -> tuple[np.ndarray, np.ndarray]:
  """(int8 values, float32 scale per latent): `w ≈ values * scale` along `latent_axis`."""
  w = np.asarray(w, np.float32)
  scale = np.max(np.abs(w), axis=1 - latent_axis) / _LARGEST["int8"]
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  shaped = np.expand_dims(scale, 1 - latent_axis)
  return np.clip(np.rint(w / shaped), -127, 127).astype(np.int8), scale


def dequantize_int8(values: np.ndarray, scale: np.ndarray, latent_axis: int) -> np.ndarray:
  return values.astype(np.float32) * np.expand_dims(np.asarray(scale, np.float32), 1 - latent_axis)


def _round(w: np.ndarray, fmt: str, latent_axis: int) -> np.ndarray:
  w = np.asarray(w, np.float32)
  if fmt == "bfloat16":
    return np.asarray(jnp.asarray(w).astype(jnp.bfloat16).astype(jnp.float32))
  if fmt == "int8":
    return dequantize_int8(*int8_per_latent(w, latent_axis), latent_axis)
  scale = np.max(np.abs(w), axis=1 - latent_axis, keepdims=True) / _LARGEST[fmt]
  scale = np.where(scale > 0, scale, 1.0)
  stored = jnp.asarray(w / scale).astype(jnp.float8_e4m3fn)
  return np.asarray(stored.astype(jnp.float32)) * scale


def quantized(sae: SAE, fmt: str) -> SAE:
  """The SAE with W_enc `[d, M]` and W_dec `[M, d]` rounded to `fmt` (QUANTIZED) and read back."""
  if fmt not in QUANTIZED:
    raise ValueError(f"quantization {fmt!r}: expected one of {QUANTIZED}")
  return sae.replace(
    W_enc=jnp.asarray(_round(sae.W_enc, fmt, latent_axis=1)), W_dec=jnp.asarray(_round(sae.W_dec, fmt, latent_axis=0))
  )
