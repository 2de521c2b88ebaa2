"""The JumpReLU training loss (docs/recipe.md §1):

    loss = Σ_p mean_b ||y - yhat_p||² + λ · mean_b S(||f||_0)   S(n) = n, or (2/L0*)(n - L0*)² (Gemma Scope 2)
           + (λ / s) · Σ_i p_i²                              (optional: the frequency penalty)
           + c · mean_b Σ_{i dead} relu(θ_i - pre_i)       (optional: pulls dead latents back)

- An SAE reconstructs its input (y = x); a transcoder predicts the target y (the MLP's output)
  from x (its input), with no pre-encoder bias, and a skip-transcoder adds `x @ W_skip` to yhat.
- `yhat_p` uses only the latents of prefix p (Matryoshka: `prefixes` are the nested prefix
  sizes, the whole width last); without prefixes the sum has one term, the whole width.
- p_i = mean_b H(pre_i - θ_i) is latent i's firing frequency in the batch. The frequency penalty
  is Gemma Scope 2's penalty on high-frequency latents in the form its authors published first
  (GDM mech interp team, "Removing High Frequency Latents from JumpReLU SAEs"): with the L0 loss,
  λ Σ_i p_i (1 + p_i / s); here its quadratic part is added to whichever sparsity loss is chosen,
  and the scale s (`frequency_scale`) is ours to set: a latent firing on more than ~s of tokens
  pays more than its L0 share. Its gradient reaches θ through the step's pseudo-derivative.

The last term is Anthropic's pre-activation loss (SAELens' `pre_act_loss_coefficient`; decoder
rows have unit norm here) on latents that have not fired for `recipe.dead_window_steps`: a latent
whose pre-activations all sit below θ - ε/2 gets no gradient from the rest of the loss, ever.

`train/step.py` computes it and its gradients block by block; the tests check those against
`jax.grad` of the same loss written with the custom-VJP `jumprelu`/`heaviside`, and against SAELens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from scope_jax.core.choices import ACTIVATIONS, SPARSITY_LOSSES


@dataclasses.dataclass(frozen=True)
class LossSpec:
  bandwidth: float = 0.001
  sparsity_loss: str = "l0"  # "quadratic": Gemma Scope 2's λ·(2/L0*)·(L0 - L0*)²
  target_l0: float | None = None  # L0* of the quadratic loss
  dead_latent_loss: float = 0.0  # c of the dead latents' pre-activation loss; 0 = off (Gemma Scope)
  frequency_scale: float = 0.0  # s of the frequency penalty; 0 = off
  transcoder: bool = False  # reconstruct a target from the input, no pre-encoder bias
  prefixes: tuple[int, ...] = ()  # Matryoshka: nested prefix sizes, increasing, the width last; () = off
  activation: str = "jumprelu"  # "topk" / "batchtopk": latents chosen by rank (train/topk.py), no sparsity term
  auxk_coefficient: float = 0.0  # α of TopK's AuxK loss; 0 = off
  auxk_k: int = 0  # dead latents per token AuxK decodes (0: train/topk.py chooses half the output width)

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation {self.activation!r}: expected one of {ACTIVATIONS}")
    if self.activation != "jumprelu":
      jumprelu_only = {
        "dead_latent_loss": self.dead_latent_loss,
        "frequency_scale": self.frequency_scale,
        "target_l0": self.target_l0,
      }  # terms that train JumpReLU's thresholds; rank-chosen latents have none
      if set_fields := {name: v for name, v in jumprelu_only.items() if v}:
        raise ValueError(
          f"{set_fields} apply to JumpReLU SAEs only; a {self.activation} SAE uses AuxK (auxk_coefficient)"
        )
    if self.auxk_coefficient < 0 or self.auxk_k < 0:
      raise ValueError(f"auxk_coefficient and auxk_k must be >= 0; got {self.auxk_coefficient}, {self.auxk_k}")
    if self.sparsity_loss not in SPARSITY_LOSSES:
      raise ValueError(f"sparsity_loss {self.sparsity_loss!r}: expected one of {SPARSITY_LOSSES}")
    if self.sparsity_loss == "quadratic" and not (self.target_l0 and self.target_l0 > 0):
      raise ValueError(f"sparsity_loss 'quadratic' needs target_l0 > 0; got {self.target_l0}")
    if self.bandwidth <= 0:
      raise ValueError(f"bandwidth must be > 0; got {self.bandwidth}")
    if self.dead_latent_loss < 0:
      raise ValueError(f"dead_latent_loss must be >= 0; got {self.dead_latent_loss}")
    if self.frequency_scale < 0:
      raise ValueError(f"frequency_scale must be >= 0 (0 = off); got {self.frequency_scale}")
    check_prefixes(self.prefixes, self.prefixes[-1] if self.prefixes else 1)

  @property
  def ranked(self) -> bool:
    """Whether latents are chosen by rank (TopK, BatchTopK) rather than by a threshold per latent."""
    return self.activation != "jumprelu"

  @property
  def pre_bias(self) -> bool:
    """Whether the encoder subtracts `b_dec` from its input (SAEs; not transcoders)."""
    return not self.transcoder

  def penalty(self, l0_b: jax.Array) -> jax.Array:
    if self.sparsity_loss == "quadratic":
      return (2.0 / self.target_l0) * jnp.square(l0_b - self.target_l0)
    return l0_b

  def penalty_slope(self, l0_b: jax.Array) -> jax.Array:
    if self.sparsity_loss == "quadratic":
      return (4.0 / self.target_l0) * (l0_b - self.target_l0)
    return jnp.ones_like(l0_b)


def check_prefixes(prefixes, width: int, field: str = "prefixes") -> tuple[int, ...]:
  """Matryoshka prefix sizes: positive, strictly increasing, none past `width`; returns them with
  the width appended when it is not already last."""
  sizes = tuple(int(p) for p in prefixes)
  if any(int(p) != p for p in prefixes) or any(p < 1 for p in sizes):
    raise ValueError(f"{field} {list(prefixes)}: expected positive integer prefix sizes")
  if any(b <= a for a, b in zip(sizes, sizes[1:])):
    raise ValueError(f"{field} {list(prefixes)}: prefix sizes must be strictly increasing")
  if sizes and sizes[-1] > width:
    raise ValueError(f"{field} {list(prefixes)}: prefix size {sizes[-1]} exceeds the SAE width {width}")
  return sizes if not sizes or sizes[-1] == width else sizes + (width,)
