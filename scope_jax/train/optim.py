"""Gemma Scope's optimizer (docs/recipe.md §2): Adam with β1 = 0 behind a cosine learning-rate warm-up,
decoder-gradient projection before the update (unit-norm decoder rows after it: `step.py`),
and optionally the gradient's global norm clipped before it all (SAELens clips at 1; Gemma Scope
published none). Clipping needs the whole gradient's norm before the first block is updated, so
the blocked step spends one more pass on it (`step.gradient_norm`, ~1.5× the step's FLOPs).

Adam is written out rather than taken from optax because the step applies it one latent block
at a time, in place, inside the loop that forms the block's gradients (`train/step.py`);
optax supplies the schedules.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


def lr_schedule(lr: float, warmup_steps: int, decay_steps: int = 0, total_steps: int = 0) -> optax.Schedule:
  """Cosine warm-up from 0.1·lr to lr over `warmup_steps`, then constant (Gemma Scope published no
  decay); with `decay_steps`, linear decay to 0 over the last `decay_steps` of `total_steps`: a
  short run at a high rate ends on parameters still jittering by lr-sized steps, the decay lets
  them settle."""
  if warmup_steps <= 0:
    warm = optax.constant_schedule(lr)
  else:
    shortfall = optax.cosine_decay_schedule(init_value=0.9 * lr, decay_steps=warmup_steps)
    warm = lambda step: lr - shortfall(step)
  if decay_steps <= 0:
    return warm
  if decay_steps > total_steps:
    raise ValueError(f"recipe.lr_decay_steps {decay_steps} is longer than the run (train.steps {total_steps})")
  return lambda step: warm(step) * jnp.clip((total_steps - step) / decay_steps, 0.0, 1.0)


def sparsity_warmup(warmup_steps: int) -> optax.Schedule:
  """Factor on λ: linear from 0 to 1 over `warmup_steps`."""
  if warmup_steps <= 0:
    return optax.constant_schedule(1.0)
  return optax.linear_schedule(0.0, 1.0, warmup_steps)


@dataclasses.dataclass(frozen=True)
class Adam:
  """Adam with bias correction (docs/recipe.md §2: β1 = 0, whose first moment would equal the gradient
  and is therefore not kept)."""

  b1: float = 0.0
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 0.0  # each step's gradient scaled to this global norm when above it; 0 = off
  lazy_updates: bool = True  # skip latents with a zero gradient (exact with β1 = 0 only: see `lazy`)

  @property
  def moment_names(self) -> tuple[str, ...]:
    return ("mu", "nu") if self.b1 else ("nu",)

  @property
  def lazy(self) -> bool:
    """Whether a latent with a zero gradient may be skipped: with β1 = 0 its parameters would not
    move and its second moments would only be multiplied by β2 (`catch_up` applies that later)."""
    return self.lazy_updates and self.b1 == 0

  def init(self, params: tuple) -> dict:
    """Zero moments for a tuple of stacked `TrainParams`, and `latent_step` `[S, M]` per group:
    the step through which each latent's moments are current (the lazy update's bookkeeping)."""
    state = {k: jax.tree.map(jnp.zeros_like, params) for k in self.moment_names}
    return state | {"latent_step": tuple(jnp.zeros(p.b_enc.shape, jnp.int32) for p in params)}

  def catch_up(self, m: dict, skipped: jax.Array) -> dict:
    """Moments `[n, ...]` of n latents that skipped `skipped` `[n]` updates with zero gradient,
    brought to what the dense update would hold: ν·β2^skipped (μ·β1^skipped). β^0 = 1 exactly,
    so a latent updated every step is bit-identical to the dense update."""

    def decay(a, beta):
      factor = jnp.power(jnp.float32(beta), skipped.astype(jnp.float32))
      return a * factor.reshape(factor.shape + (1,) * (a.ndim - factor.ndim))

    return {k: decay(v, self.b2 if k == "nu" else self.b1) for k, v in m.items()}

  def moments(self, g: jax.Array, m: dict) -> dict:
    new = {"nu": self.b2 * m["nu"] + (1 - self.b2) * jnp.square(g)}
    if self.b1:
      new["mu"] = self.b1 * m["mu"] + (1 - self.b1) * g
    return new

  def apply(self, p: jax.Array, g: jax.Array, m: dict, t: jax.Array, lr: jax.Array) -> jax.Array:
    """`p` after update number `t` (1-based), given the moments already updated with `g`."""
    mean = m["mu"] / (1 - self.b1**t) if self.b1 else g
    return p - lr * mean / (jnp.sqrt(m["nu"] / (1 - self.b2**t)) + self.eps)


def project_rows(g_kd: jax.Array, w_kd: jax.Array) -> jax.Array:
  """Removes from each row of g its component along the (unit) row of w, so the update stays
  tangent to the unit sphere of each latent's decoder row."""
  return g_kd - jnp.sum(g_kd * w_kd, axis=-1, keepdims=True) * w_kd
