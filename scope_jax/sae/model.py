"""The JumpReLU SAE (and transcoder) as a plain pytree: released form, training form, initialization, folding.

One `SAE` holds `W_enc [..., d_in, M]`, `b_enc [..., M]`, `W_dec [..., M, d_out]`, `b_dec [..., d_out]`,
a float32 `threshold [..., M]` and, for a skip-transcoder, `W_skip [..., d_in, d_out]` (None
otherwise); the optional leading axis stacks the SAEs of a sweep. `info` (not a leaf) says where
the SAE belongs: an SAE reconstructs its input (`d_in = d_out`); a transcoder (`info.target_site`
set) predicts another site of the same layer from it (docs/recipe.md §4).

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

from scope_jax.parallel.precision import matmul
from scope_jax.sae.topk import topk_mask

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")  # every SAE's; a skip-transcoder adds W_skip


@dataclasses.dataclass(frozen=True)
class SAEInfo:
  """Where an SAE belongs; carried through export so SAELens and eval know its site."""

  site: str | None = None  # e.g. "res.6"
  model: str | None = None  # model source or name
  context_size: int | None = None  # sequence length of the training activations
  dataset: str | None = None  # text source spec
  l1_coefficient: float | None = None  # λ it was trained with
  target_site: str | None = None  # a transcoder's target (e.g. "mlp.6" for site "mlp_in.6"); None: an SAE
  prefixes: tuple[int, ...] = ()  # a Matryoshka SAE's nested prefix sizes (the last is its width)
  activation: str = "jumprelu"  # how `encode` selects latents: "jumprelu" (θ per latent) or "topk" (k per token)
  k: int | None = None  # TopK's latents per token (sae/topk.py); None for JumpReLU

  @property
  def output_site(self) -> str | None:
    """The site whose activation the SAE's output stands for (and replaces when spliced)."""
    return self.target_site or self.site


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SAE:
  W_enc: jax.Array  # [..., d, M]
  b_enc: jax.Array  # [..., M]
  W_dec: jax.Array  # [..., M, d]
  b_dec: jax.Array  # [..., d]
  threshold: jax.Array  # [..., M] float32
  W_skip: jax.Array | None = None  # [..., d_in, d_out]: a skip-transcoder's affine skip (b_dec is its bias)
  info: SAEInfo = dataclasses.field(default=SAEInfo(), metadata=dict(static=True))

  @property
  def d_in(self) -> int:
    return self.W_enc.shape[-2]

  @property
  def width(self) -> int:
    return self.W_enc.shape[-1]

  def encode(self, x_bd: jax.Array) -> jax.Array:
    """Latents `[..., M]` of the released form: `JumpReLU_θ(x @ W_enc + b_enc)`, or for TopK each
    token's k largest pre-activations, ReLU'd (sae/topk.py; θ is then unused)."""
    pre_bm = matmul(x_bd, self.W_enc) + self.b_enc
    if self.info.activation == "topk":
      keep = topk_mask(pre_bm.reshape(-1, self.width), self.info.k).reshape(pre_bm.shape)
      return jnp.where(keep, pre_bm, 0).astype(pre_bm.dtype)
    return jnp.where(pre_bm > self.threshold, jax.nn.relu(pre_bm), 0).astype(pre_bm.dtype)

  def decode(self, f_bm: jax.Array) -> jax.Array:
    """Reconstruction `[..., d]`: `f @ W_dec + b_dec`."""
    return matmul(f_bm, self.W_dec) + self.b_dec

  def __call__(self, x_bd: jax.Array) -> jax.Array:
    """The reconstruction (SAE) or prediction (transcoder) from the input `x_bd`."""
    return self.decode(self.encode(x_bd)) + self.skip(x_bd)

  def skip(self, x_bd: jax.Array) -> jax.Array | float:
    """A skip-transcoder's `x @ W_skip`; 0 for the others."""
    return 0.0 if self.W_skip is None else matmul(x_bd, self.W_skip)

  @property
  def names(self) -> tuple[str, ...]:
    """The names of the parameters this SAE holds."""
    return PARAM_NAMES + (() if self.W_skip is None else ("W_skip",))

  def replace(self, **changes) -> SAE:
    return dataclasses.replace(self, **changes)

  def astype(self, dtype) -> SAE:
    """Weights and biases in `dtype`; the threshold stays float32."""
    return self.replace(**{k: getattr(self, k).astype(dtype) for k in self.names if k != "threshold"})

  def numpy(self) -> dict[str, np.ndarray]:
    """Every parameter as a C-ordered float32 array: safetensors writes a buffer as it lies in
    memory, so a transposed view (the trainer's latent-major W_enc, swapped) would be written wrong."""
    return {k: np.ascontiguousarray(getattr(self, k), np.float32) for k in self.names}


def training_pre(sae: SAE, x_bd: jax.Array, transcoder: bool = False) -> jax.Array:
  """Pre-activations `[B, M]` of the training form: an SAE subtracts the pre-encoder bias `b_dec`
  from its input, a transcoder (whose `b_dec` lives in the target's space) does not."""
  return matmul(x_bd if transcoder else x_bd - sae.b_dec, sae.W_enc) + sae.b_enc


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


def init_transcoder(
  key: jax.Array, d_in: int, d_out: int, width: int, threshold: float, b_dec: jax.Array, skip: bool = False
) -> SAE:
  """A transcoder at init (docs/recipe.md §4: no W_enc = W_decᵀ tie, input and target differ):
  W_dec as an SAE's, `[width, d_out]` with unit rows; W_enc drawn the same way from its own key,
  unit-norm columns `[d_in, width]`; zero `b_enc`; `b_dec` at the target's mean; θ constant; and
  for a skip-transcoder `W_skip = 0`, so training starts from the plain transcoder and the skip
  learns only the affine part the latents would otherwise spend width on."""
  key_enc, key_dec = jax.random.split(key)
  W_dec_md = init_sae(key_dec, d_out, width).W_dec
  return SAE(
    W_enc=init_sae(key_enc, d_in, width).W_enc,
    b_enc=jnp.zeros((width,), jnp.float32),
    W_dec=W_dec_md,
    b_dec=jnp.asarray(b_dec, jnp.float32),
    threshold=jnp.full((width,), threshold, jnp.float32),
    W_skip=jnp.zeros((d_in, d_out), jnp.float32) if skip else None,
  )


def fold(sae: SAE, scale: float, target_scale: float | None = None) -> SAE:
  """Training form on `x / C` → released form on raw `x` (C = `scale`), docs/recipe.md §3.

  Released latents are C times the training latents and the reconstruction is C times the
  training reconstruction, i.e. the same reconstruction of the raw input.

  A transcoder (`target_scale` = C_y, its target's divisor) trains on `x / C_x` to predict
  `y / C_y` with no pre-encoder bias: released latents are C_x times the training ones, so the
  decoder and skip take C_y / C_x and the bias C_y.
  """
  if target_scale is not None:
    ratio = target_scale / scale
    return sae.replace(
      b_enc=scale * sae.b_enc,
      W_dec=ratio * sae.W_dec,
      b_dec=target_scale * sae.b_dec,
      threshold=(scale * sae.threshold).astype(jnp.float32),
      W_skip=None if sae.W_skip is None else ratio * sae.W_skip,
    )
  b_dec_w = jnp.einsum("...d,...dm->...m", sae.b_dec, sae.W_enc)
  return sae.replace(
    b_enc=scale * (sae.b_enc - b_dec_w), b_dec=scale * sae.b_dec, threshold=(scale * sae.threshold).astype(jnp.float32)
  )


def unfold(sae: SAE, scale: float, target_scale: float | None = None) -> SAE:
  """`fold`'s inverse: a released SAE (or transcoder) in the training form on `x / C`, with its
  decoder rows made unit-norm as the trainer keeps them (a row of norm n is divided by n and its
  latent's encoder column, bias and threshold multiplied by n: the same function). Rows within
  1e-5 of unit norm are left as they are, so our own exports come back unchanged."""
  if target_scale is not None:
    ratio = target_scale / scale
    sae = sae.replace(
      b_enc=sae.b_enc / scale,
      W_dec=sae.W_dec / ratio,
      b_dec=sae.b_dec / target_scale,
      threshold=sae.threshold / scale,
      W_skip=None if sae.W_skip is None else sae.W_skip / ratio,
    )
  else:
    b_dec = sae.b_dec / scale
    sae = sae.replace(b_enc=sae.b_enc / scale + b_dec @ sae.W_enc, b_dec=b_dec, threshold=sae.threshold / scale)
  norm_m = jnp.linalg.norm(sae.W_dec, axis=-1)
  n_m = jnp.where((jnp.abs(norm_m - 1) > 1e-5) & (norm_m > 0), norm_m, 1.0)
  return sae.replace(
    W_enc=sae.W_enc * n_m, b_enc=sae.b_enc * n_m, W_dec=sae.W_dec / n_m[:, None], threshold=sae.threshold * n_m
  )


def unstack(sae: SAE) -> list[SAE]:
  """The SAEs of a stacked sweep group, one per leading index."""
  return [jax.tree.map(lambda a, i=i: a[i], sae) for i in range(sae.W_enc.shape[0])]
