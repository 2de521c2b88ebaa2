"""TopK and BatchTopK selection as a threshold: the k-th largest value, found exactly by bisection.

TopK (Gao et al. 2024) keeps each token's k largest pre-activations, then applies ReLU; BatchTopK
(Bussmann et al. 2024) keeps the k·B largest ReLU'd pre-activations of a batch of B tokens. Both
are a threshold τ on the values, per token or per batch: a value is kept when it is ≥ τ and
positive, τ being the k-th largest value.

τ is found on the bits of the ReLU'd values (for non-negative float32 the uint32 bit patterns
order as the floats do) by bisection: 31 rounds, each counting the values at or above a
candidate. The counts are integers, so τ does not depend on how the values are split into blocks,
over devices or summed: a latent axis sharded over devices gives the unsharded selection exactly,
which `lax.top_k` per shard and a merge would too, at 36× the encoder's cost on XLA:CPU (measured,
benchmarks/README.md). Ties at τ are all kept: a token keeps more than k latents only where two
pre-activations are bitwise equal at its k-th place. `lax.top_k` would break them by index.

`count_at_least(bits_candidate) -> count` is the caller's: it sums over whatever it holds
(blocks, the `model` axis, the `data` axis for a batch).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

ROUNDS = 31  # the bits below a non-negative float32's sign bit


def relu_bits(pre: jax.Array) -> jax.Array:
  """uint32 bits of `max(pre, 0)` as +0.0 where `pre` is not positive (the bits of -0.0 would
  order above every positive value)."""
  return lax.bitcast_convert_type(jnp.where(pre > 0, pre, 0.0).astype(jnp.float32), jnp.uint32)


def kth_largest_bits(count_at_least: Callable[[jax.Array], jax.Array], shape: tuple[int, ...], k) -> jax.Array:
  """The largest uint32 `t` (per element of `shape`) with `count_at_least(t) >= k`: the bits of the
  k-th largest value (0 when fewer than k values are positive). `k` broadcasts against `shape`."""

  def round_(i, t):
    candidate = t | (jnp.uint32(1) << (ROUNDS - 1 - i).astype(jnp.uint32))
    return jnp.where(count_at_least(candidate) >= k, candidate, t)

  return lax.fori_loop(0, ROUNDS, round_, jnp.zeros(shape, jnp.uint32))


def as_float(bits: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(bits, jnp.float32)


def row_threshold(pre_bm: jax.Array, k) -> jax.Array:
  """τ per row `[B]`: the k-th largest ReLU'd value of each row of `pre_bm` `[B, M]` (`k` a scalar
  or `[B]`)."""
  bits_bm = relu_bits(pre_bm)
  count = lambda t_b: jnp.sum(bits_bm >= t_b[:, None], axis=-1, dtype=jnp.int32)
  return as_float(kth_largest_bits(count, pre_bm.shape[:1], k))


def topk_mask(pre_bm: jax.Array, k) -> jax.Array:
  """Which latents TopK keeps `[B, M]`: at or above the row's k-th largest value, and positive."""
  return (pre_bm >= row_threshold(pre_bm, k)[:, None]) & (pre_bm > 0)
