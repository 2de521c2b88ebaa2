"""The custom VJPs against the closed-form pseudo-derivatives and against SAELens's autograd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLU as LensJumpReLU
from sae_lens.saes.jumprelu_sae import Step as LensStep

from scope_jax.sae import heaviside, jumprelu

EPS = 0.05


def _inputs(seed=0, shape=(6, 5, 32)):
  """z with a third of its entries placed inside the kernel window |z - θ| < ε/2."""
  rng = np.random.default_rng(seed)
  threshold = rng.uniform(0.1, 1.0, shape[-1]).astype(np.float32)
  z = rng.normal(0.5, 0.6, shape).astype(np.float32)
  near = rng.random(shape) < 1 / 3
  z = np.where(near, threshold + rng.uniform(-0.49, 0.49, shape) * EPS, z).astype(np.float32)
  g = rng.normal(size=shape).astype(np.float32)
  return z, threshold, g


def _kernel(z, threshold):
  u = (z - threshold) / EPS
  return ((u > -0.5) & (u < 0.5)).astype(np.float32)


def test_jumprelu_vjp_is_the_closed_form():
  z, threshold, g = _inputs()
  out, vjp = jax.vjp(lambda z, t: jumprelu(z, t, EPS), z, threshold)
  dz, dthreshold = vjp(g)
  np.testing.assert_array_equal(out, z * (z > threshold))
  np.testing.assert_allclose(dz, g * (z > threshold), rtol=0, atol=0)
  expected = np.sum(-(threshold / EPS) * _kernel(z, threshold) * g, axis=(0, 1))
  assert _kernel(z, threshold).sum() > 50  # the window really is exercised
  np.testing.assert_allclose(dthreshold, expected, rtol=1e-5, atol=1e-4)
  assert dthreshold.shape == threshold.shape and dthreshold.dtype == jnp.float32


def test_step_vjp_is_the_closed_form_and_gives_no_gradient_to_z():
  z, threshold, g = _inputs(1)
  out, vjp = jax.vjp(lambda z, t: heaviside(z, t, EPS), z, threshold)
  dz, dthreshold = vjp(g)
  np.testing.assert_array_equal(out, (z > threshold).astype(np.float32))
  assert not np.any(np.asarray(dz))
  expected = np.sum(-(1 / EPS) * _kernel(z, threshold) * g, axis=(0, 1))
  np.testing.assert_allclose(dthreshold, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("fn, lens_fn", [(jumprelu, LensJumpReLU), (heaviside, LensStep)])
def test_vjps_equal_saelens_autograd(fn, lens_fn):
  z, threshold, g = _inputs(2, shape=(64, 48))
  zt = torch.tensor(z, requires_grad=True)
  tt = torch.tensor(threshold, requires_grad=True)
  out_t = lens_fn.apply(zt, tt, EPS, False)
  out_t.backward(torch.tensor(g))
  out, vjp = jax.vjp(lambda z, t: fn(z, t, EPS), z, threshold)
  dz, dthreshold = vjp(g)
  np.testing.assert_array_equal(out, out_t.detach().numpy())
  np.testing.assert_allclose(dz, 0 if zt.grad is None else zt.grad.numpy(), atol=0)
  np.testing.assert_allclose(dthreshold, tt.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_bfloat16_inputs_keep_a_float32_threshold_gradient():
  z, threshold, g = _inputs(3)
  dz, dthreshold = jax.grad(lambda z, t: jnp.sum(jumprelu(z, t, EPS) * g), argnums=(0, 1))(
    jnp.asarray(z, jnp.bfloat16), jnp.asarray(threshold)
  )
  assert dz.dtype == jnp.bfloat16 and dthreshold.dtype == jnp.float32
