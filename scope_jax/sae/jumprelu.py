"""JumpReLU and its Heaviside step with the straight-through pseudo-derivatives of docs/recipe.md §1.

Both take `z [..., M]` and a float32 `threshold [M]` broadcast over the leading axes; the
threshold's cotangent is summed over those axes. With the rectangle kernel
`K(u) = 1 if -1/2 < u < 1/2 else 0` and bandwidth ε:

    d/dθ JumpReLU_θ(z) = -(θ/ε)·K((z-θ)/ε)      d/dz JumpReLU_θ(z) = H(z-θ)
    d/dθ H(z-θ)        = -(1/ε)·K((z-θ)/ε)      d/dz H(z-θ)        = 0

so the L0 term (a sum of steps) trains only the threshold.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _rectangle(u: jax.Array) -> jax.Array:
  return ((u > -0.5) & (u < 0.5)).astype(jnp.float32)


def _sum_to_threshold(d_bm: jax.Array, threshold_m: jax.Array) -> jax.Array:
  leading = tuple(range(d_bm.ndim - threshold_m.ndim))
  return jnp.sum(d_bm, axis=leading).astype(threshold_m.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
  """`z · H(z - θ)`: z where it exceeds the threshold, else 0."""
  return jnp.where(z > threshold, z, jnp.zeros_like(z))


def _jumprelu_fwd(z, threshold, bandwidth):
  return jumprelu(z, threshold, bandwidth), (z, threshold)


def _jumprelu_bwd(bandwidth, residuals, g):
  z, threshold = residuals
  dz = jnp.where(z > threshold, g, jnp.zeros_like(g))
  kernel = _rectangle((z.astype(jnp.float32) - threshold) / bandwidth)
  dthreshold = -(threshold / bandwidth) * kernel * g.astype(jnp.float32)
  return dz, _sum_to_threshold(dthreshold, threshold)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
  """`H(z - θ)` as z's dtype: 1 where z exceeds the threshold, else 0."""
  return (z > threshold).astype(z.dtype)


def _heaviside_fwd(z, threshold, bandwidth):
  return heaviside(z, threshold, bandwidth), (z, threshold)


def _heaviside_bwd(bandwidth, residuals, g):
  z, threshold = residuals
  kernel = _rectangle((z.astype(jnp.float32) - threshold) / bandwidth)
  dthreshold = -(1.0 / bandwidth) * kernel * g.astype(jnp.float32)
  return jnp.zeros_like(z), _sum_to_threshold(dthreshold, threshold)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)
