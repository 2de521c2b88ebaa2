"""The JumpReLU SAE as a plain pytree: released form, training form, initialization, folding.

One `SAE` holds `W_enc [..., d, M]`, `b_enc [..., M]`, `W_dec [..., M, d]`, `b_dec [..., d]`
and a float32 `threshold [..., M]`; the optional leading axis stacks the SAEs of a sweep so
that `jax.vmap` trains them together. `info` (not a leaf) says where the SAE belongs.

Two forms share the class:
- *released* (what files hold and `encode` computes): `pre = x @ W_enc + b_enc`, raw inputs;
- *training* (what the trainer updates): `pre = (x - b_dec) @ W_enc + b_enc` (pre-encoder bias)
  on inputs divided by the normalization scalar C. `fold` turns one into the other (docs/recipe.md §3).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


@dataclasses.dataclass(frozen=True)
class SAEInfo:
  """Where an SAE belongs; carried through export so SAELens and eval know its site."""

  site: str | None = None  # e.g. "res.6"
  model: str | None = None  # model source or name
  context_size: int | None = None  # sequence length of the training activations
  dataset: str | None = None  # text source spec
  l1_coefficient: float | None = None  # λ it was trained with


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SAE:
  W_enc: jax.Array  # [..., d, M]
  b_enc: jax.Array  # [..., M]
  W_dec: jax.Array  # [..., M, d]
  b_dec: jax.Array  # [..., d]
  threshold: jax.Array  # [..., M] float32
  info: SAEInfo = dataclasses.field(default=SAEInfo(), metadata=dict(static=True))

  @property
  def d_in(self) -> int:
    return self.W_enc.shape[-2]

  @property
  def width(self) -> int:
    return self.W_enc.shape[-1]

  def encode(self, x_bd: jax.Array) -> jax.Array:
    """Latents `[..., M]` of the released form: `JumpReLU_θ(x @ W_enc + b_enc)`."""
    pre_bm = x_bd @ self.W_enc + self.b_enc
    return jnp.where(pre_bm > self.threshold, jax.nn.relu(pre_bm), 0).astype(pre_bm.dtype)

  def decode(self, f_bm: jax.Array) -> jax.Array:
    """Reconstruction `[..., d]`: `f @ W_dec + b_dec`."""
    return f_bm @ self.W_dec + self.b_dec

  def __call__(self, x_bd: jax.Array) -> jax.Array:
    return self.decode(self.encode(x_bd))

  def replace(self, **changes) -> SAE:
    return dataclasses.replace(self, **changes)

  def astype(self, dtype) -> SAE:
    """Weights and biases in `dtype`; the threshold stays float32."""
    return self.replace(**{k: getattr(self, k).astype(dtype) for k in PARAM_NAMES if k != "threshold"})

  def numpy(self) -> dict[str, np.ndarray]:
    return {k: np.asarray(getattr(self, k), np.float32) for k in PARAM_NAMES}


def training_pre(sae: SAE, x_bd: jax.Array) -> jax.Array:
  """Pre-activations `[B, M]` of the training form (pre-encoder bias subtracted)."""
  return (x_bd - sae.b_dec) @ sae.W_enc + sae.b_enc


def init_sae(key: jax.Array, d_in: int, width: int, threshold: float = 0.001, b_dec: jax.Array | None = None) -> SAE:
  """docs/recipe.md §2: W_dec He-uniform with unit rows, W_enc = W_decᵀ, zero biases, θ constant; `b_dec`
  given (the data's mean) instead of zero where the data has an offset."""
  W_dec_md = jax.nn.initializers.he_uniform(in_axis=0, out_axis=1)(key, (width, d_in), jnp.float32)
  W_dec_md = W_dec_md / jnp.linalg.norm(W_dec_md, axis=-1, keepdims=True)
  return SAE(
    W_enc=W_dec_md.T,
    b_enc=jnp.zeros((width,), jnp.float32),
    W_dec=W_dec_md,
    b_dec=jnp.zeros((d_in,), jnp.float32) if b_dec is None else jnp.asarray(b_dec, jnp.float32),
    threshold=jnp.full((width,), threshold, jnp.float32),
  )


def fold(sae: SAE, scale: float) -> SAE:
  """Training form on `x / C` → released form on raw `x` (C = `scale`), docs/recipe.md §3.

  Released latents are C times the training latents and the reconstruction is C times the
  training reconstruction, i.e. the same reconstruction of the raw input.
  """
  b_dec_w = jnp.einsum("...d,...dm->...m", sae.b_dec, sae.W_enc)
  return sae.replace(
    b_enc=scale * (sae.b_enc - b_dec_w), b_dec=scale * sae.b_dec, threshold=(scale * sae.threshold).astype(jnp.float32)
  )


def unstack(sae: SAE) -> list[SAE]:
  """The SAEs of a stacked sweep group, one per leading index."""
  return [jax.tree.map(lambda a, i=i: a[i], sae) for i in range(sae.W_enc.shape[0])]
