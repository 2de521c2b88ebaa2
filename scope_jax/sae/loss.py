"""The JumpReLU training loss (docs/recipe.md §1):

    loss = mean_b ||x - xhat||² + λ · mean_b S(||f||_0)      S(n) = n, or (2/L0*)(n - L0*)² (Gemma Scope 2)
           + c · mean_b Σ_{i dead} relu(θ_i - pre_i)       (optional: pulls dead latents back)

The last term is Anthropic's pre-activation loss (SAELens' `pre_act_loss_coefficient`; decoder
rows have unit norm here) on latents that have not fired for `recipe.dead_window_steps`: a latent
whose pre-activations all sit below θ - ε/2 gets no gradient from the rest of the loss, ever.

`train/step.py` computes it and its gradients block by block; the tests check those against
`jax.grad` of the same loss written with the custom-VJP `jumprelu`/`step`, and against SAELens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SPARSITY_LOSSES = ("l0", "quadratic")


@dataclasses.dataclass(frozen=True)
class LossSpec:
  bandwidth: float = 0.001
  sparsity_loss: str = "l0"  # "quadratic": Gemma Scope 2's λ·(2/L0*)·(L0 - L0*)²
  target_l0: float | None = None  # L0* of the quadratic loss
  dead_latent_loss: float = 0.0  # c of the dead latents' pre-activation loss; 0 = off (Gemma Scope)

  def __post_init__(self):
    if self.sparsity_loss not in SPARSITY_LOSSES:
      raise ValueError(f"sparsity_loss {self.sparsity_loss!r}: expected one of {SPARSITY_LOSSES}")
    if self.sparsity_loss == "quadratic" and not (self.target_l0 and self.target_l0 > 0):
      raise ValueError(f"sparsity_loss 'quadratic' needs target_l0 > 0; got {self.target_l0}")
    if self.bandwidth <= 0:
      raise ValueError(f"bandwidth must be > 0; got {self.bandwidth}")
    if self.dead_latent_loss < 0:
      raise ValueError(f"dead_latent_loss must be >= 0; got {self.dead_latent_loss}")

  def penalty(self, l0_b: jax.Array) -> jax.Array:
    if self.sparsity_loss == "quadratic":
      return (2.0 / self.target_l0) * jnp.square(l0_b - self.target_l0)
    return l0_b

  def penalty_slope(self, l0_b: jax.Array) -> jax.Array:
    if self.sparsity_loss == "quadratic":
      return (4.0 / self.target_l0) * (l0_b - self.target_l0)
    return jnp.ones_like(l0_b)
