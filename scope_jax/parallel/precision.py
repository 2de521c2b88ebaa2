"""The matmuls' precision: a choice in the config (`precision`), never the backend's default.

An unqualified float32 matmul computes something different on each backend: true float32 on CPU,
TF32 on NVIDIA GPUs since Ampere, one bfloat16 pass on TPU. The same config would then train
different SAEs on different hardware. Here every program the project runs (the training step,
the model's forward and its split halves, the eval engine's splices) is traced under one of:

- `float32`: every dot at `Precision.HIGHEST`, true float32 on every backend (Gemma Scope trained
  "in float32"; the default). On CPU this is what an unqualified matmul computes, bit for bit.
- `bfloat16`: operands rounded to bfloat16, products accumulated in float32 (the tensor-core and
  MXU path, `BF16_BF16_F32`). The rounding is written out in `matmul` and `einsum`, so a CPU
  computes what an accelerator does (XLA's CPU backend ignores dot algorithms) and the local run
  measures what the fast path costs in SAE quality.

`traced_at(name)` enters jax's own `default_matmul_precision`, which jit keys its cache by, so one
process may compile both.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

PRECISIONS = {"float32": "highest", "bfloat16": "BF16_BF16_F32"}  # name -> jax's matmul precision


def check_precision(name: str) -> str:
  if name not in PRECISIONS:
    raise ValueError(f"precision {name!r}: expected one of {tuple(PRECISIONS)}")
  return name


def traced_at(name: str) -> contextlib.AbstractContextManager:
  """The context a program is traced in to run its matmuls at precision `name`."""
  return jax.default_matmul_precision(PRECISIONS[check_precision(name)])


def at_precision(name: str, fn):
  """`fn` traced at precision `name` (what a jitted program's body is wrapped in)."""
  check_precision(name)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with traced_at(name):
      return fn(*args, **kwargs)

  return wrapped


def _rounds_to_bfloat16() -> bool:
  return jax.config.jax_default_matmul_precision == PRECISIONS["bfloat16"]


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a @ b` at the precision being traced: with `bfloat16`, the operands rounded to bfloat16 and
  the products summed in float32; the result in the operands' dtype."""
  if not _rounds_to_bfloat16():
    return jnp.matmul(a, b)
  out = jnp.result_type(a, b)
  return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32).astype(out)


def einsum(subscripts: str, *operands: jax.Array, preferred_element_type=None) -> jax.Array:
  """`jnp.einsum` at the precision being traced, rounding as `matmul` does; the result in
  `preferred_element_type` or the operands' dtype."""
  if not _rounds_to_bfloat16():
    return jnp.einsum(subscripts, *operands, preferred_element_type=preferred_element_type)
  out = preferred_element_type or jnp.result_type(*operands)
  rounded = [x.astype(jnp.bfloat16) for x in operands]
  return jnp.einsum(subscripts, *rounded, preferred_element_type=jnp.float32).astype(out)
