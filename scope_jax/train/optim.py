"""Gemma Scope's optimizer (RECIPE §2): Adam with β1 = 0 behind a cosine learning-rate warm-up,
decoder-gradient projection before the update and unit-norm decoder rows after it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from scope_jax.sae.model import SAE


def lr_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
  """Cosine warm-up from 0.1·lr to lr over `warmup_steps`, then constant (no decay published)."""
  if warmup_steps <= 0:
    return optax.constant_schedule(lr)
  shortfall = optax.cosine_decay_schedule(init_value=0.9 * lr, decay_steps=warmup_steps)
  return lambda step: lr - shortfall(step)


def sparsity_warmup(warmup_steps: int) -> optax.Schedule:
  """Factor on λ: linear from 0 to 1 over `warmup_steps`."""
  if warmup_steps <= 0:
    return optax.constant_schedule(1.0)
  return optax.linear_schedule(0.0, 1.0, warmup_steps)


def _project_rows(g_md: jax.Array, w_md: jax.Array) -> jax.Array:
  """Removes from each row of g its component along the (unit) row of w."""
  return g_md - jnp.sum(g_md * w_md, axis=-1, keepdims=True) * w_md


def project_decoder_gradients() -> optax.GradientTransformation:
  """Keeps decoder updates tangent to the unit sphere of each latent's row."""

  def update(updates, state, params):
    projected = jax.tree.map(lambda g, p: g.replace(W_dec=_project_rows(g.W_dec, p.W_dec)),
                             updates, params, is_leaf=lambda x: isinstance(x, SAE))
    return projected, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(lr: float, lr_warmup_steps: int, b1: float = 0.0, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam; with β1 = 0 its first moment is just the gradient, so it is not stored (optax's
  bias-corrected `scale_by_rms` is exactly Adam(β1=0) with a third less optimizer memory)."""
  if b1 == 0:
    scale = optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True)
  else:
    scale = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  return optax.chain(project_decoder_gradients(), scale,
                     optax.scale_by_learning_rate(lr_schedule(lr, lr_warmup_steps)))


def constrain(sae: SAE) -> SAE:
  """After an update: unit-norm decoder rows and a non-negative threshold."""
  W_dec = sae.W_dec / jnp.linalg.norm(sae.W_dec, axis=-1, keepdims=True)
  return dataclasses.replace(sae, W_dec=W_dec, threshold=jnp.maximum(sae.threshold, 0.0))
