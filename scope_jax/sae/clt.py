"""The cross-layer transcoder (CLT): latents read at one layer's MLP input and write to that MLP's
output and every later one's (docs/recipe.md §14; Anthropic, "Circuit Tracing", 2025).

For the CLT's layers ℓ = 0 … L-1 (model layers `first … first + L - 1`):

    a^ℓ = JumpReLU_θℓ(x^ℓ W_enc^ℓ + b_enc^ℓ)              x^ℓ = mlp_in of layer ℓ     [batch, F]
    ŷ^t = Σ_{ℓ ≤ t} a^ℓ W_dec^ℓ[:, t - ℓ] + b_dec^t       y^t = mlp (the MLP's output) of layer t

`W_dec[ℓ]` is `[F, L - ℓ, d]`: latent i of layer ℓ writes row `W_dec[ℓ][i, j]` into layer ℓ + j.
Parameters: d·F·L encoder + d·F·L(L+1)/2 decoder. The layout is circuit-tracer's
(`W_dec_i [d_sae, n_layers - i, d_model]`), with the encoder `[L, d, F]` as our SAEs keep it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from scope_jax.sae.jumprelu import jumprelu


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CLT:
  W_enc: jax.Array  # [L, d_in, F]
  b_enc: jax.Array  # [L, F]
  threshold: jax.Array  # [L, F]
  W_dec: tuple[jax.Array, ...]  # L arrays, [F, L - ℓ, d_out]
  b_dec: jax.Array  # [L, d_out]

  @property
  def layers(self) -> int:
    return self.W_enc.shape[-3]

  @property
  def width(self) -> int:
    """F: latents per layer."""
    return self.W_enc.shape[-1]

  @property
  def d_in(self) -> int:
    return self.W_enc.shape[-2]

  @property
  def d_out(self) -> int:
    return self.b_dec.shape[-1]

  def replace(self, **changes) -> CLT:
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class CLTInfo:
  """What a released CLT is for: the model and its layers `first … first + layers - 1`."""

  model: str
  first_layer: int
  layers: int
  l1_coefficient: float = 0.0

  @property
  def model_layers(self) -> list[int]:
    return list(range(self.first_layer, self.first_layer + self.layers))


def check_shapes(clt: CLT, where: str) -> None:
  """ValueError naming `where` and the first array whose shape does not fit a CLT."""
  L, d_in, F = clt.W_enc.shape
  d_out = clt.b_dec.shape[-1]
  expected = {"b_enc": (L, F), "threshold": (L, F), "b_dec": (L, d_out)}
  for name, shape in expected.items():
    if tuple(getattr(clt, name).shape) != shape:
      got = tuple(getattr(clt, name).shape)
      raise ValueError(f"{where}: {name} has shape {got}; expected {shape} (W_enc {(L, d_in, F)})")
  if len(clt.W_dec) != L:
    raise ValueError(f"{where}: {len(clt.W_dec)} decoders for {L} layers")
  for layer, w in enumerate(clt.W_dec):
    if tuple(w.shape) != (F, L - layer, d_out):
      raise ValueError(f"{where}: W_dec of layer {layer} has shape {tuple(w.shape)}; expected {(F, L - layer, d_out)}")


def per_layer(fn):
  """`fn(z [b, F], θ [F], ε)` (jumprelu, heaviside) applied to `z [L, b, F]` with θ `[L, F]`."""
  return jax.vmap(fn, in_axes=(0, 0, None))


def pre_activations(clt: CLT, x_lbd: jax.Array) -> jax.Array:
  """`[L, batch, F]`: each layer's encoder on its own MLP input."""
  return jnp.einsum("lbd,ldf->lbf", x_lbd, clt.W_enc) + clt.b_enc[:, None, :]


def encode(clt: CLT, x_lbd: jax.Array, bandwidth: float = 0.001) -> jax.Array:
  """`[L, batch, F]` latent activations."""
  return per_layer(jumprelu)(pre_activations(clt, x_lbd), clt.threshold, bandwidth)


def decode(clt: CLT, a_lbf: jax.Array) -> jax.Array:
  """`[L, batch, d_out]`: every layer's reconstructed MLP output from the latents at or before it."""
  out = [jnp.broadcast_to(clt.b_dec[t], (a_lbf.shape[1], clt.d_out)) for t in range(clt.layers)]
  for source, w_ftd in enumerate(clt.W_dec):
    written_btd = jnp.einsum("bf,ftd->btd", a_lbf[source], w_ftd)
    for j in range(w_ftd.shape[1]):
      out[source + j] = out[source + j] + written_btd[:, j]
  return jnp.stack(out)


def forward(clt: CLT, x_lbd: jax.Array) -> jax.Array:
  return decode(clt, encode(clt, x_lbd))


def decoder_norms(clt: CLT) -> jax.Array:
  """`[L, F]`: each latent's decoder norm, concatenated over the layers it writes to (the
  sparsity penalty's weight)."""
  return jnp.stack([jnp.sqrt(jnp.sum(jnp.square(w), axis=(-2, -1))) for w in clt.W_dec])


def init_clt(
  key: jax.Array, layers: int, d_in: int, d_out: int, width: int, threshold: float, b_dec_ld: jax.Array
) -> CLT:
  """A CLT at init: each layer's encoder columns random unit vectors; each latent's decoder a
  random direction over all the layers it writes to, of norm 1 (so the sparsity weight starts at
  1, as a unit-norm transcoder's); zero `b_enc`; `b_dec` at each target's mean; θ constant."""
  key_enc, *keys_dec = jax.random.split(key, layers + 1)
  W_enc = jax.random.normal(key_enc, (layers, d_in, width), jnp.float32)
  W_enc = W_enc / jnp.linalg.norm(W_enc, axis=1, keepdims=True)
  W_dec = []
  for layer, k in enumerate(keys_dec):
    w = jax.random.normal(k, (width, layers - layer, d_out), jnp.float32)
    W_dec.append(w / jnp.sqrt(jnp.sum(jnp.square(w), axis=(1, 2), keepdims=True)))
  return CLT(
    W_enc=W_enc,
    b_enc=jnp.zeros((layers, width), jnp.float32),
    threshold=jnp.full((layers, width), threshold, jnp.float32),
    W_dec=tuple(W_dec),
    b_dec=jnp.asarray(b_dec_ld, jnp.float32),
  )


def fold(clt: CLT, input_scales: np.ndarray, output_scales: np.ndarray) -> CLT:
  """Training form (layer ℓ's input divided by `input_scales[ℓ]`, target t's by `output_scales[t]`)
  → released form on raw activations. As for a transcoder (sae/model.py `fold`), released latents
  are C_x^ℓ times the training ones; the decoder from ℓ to t takes C_y^t / C_x^ℓ, `b_dec^t` C_y^t."""
  cx = jnp.asarray(input_scales, jnp.float32)
  cy = jnp.asarray(output_scales, jnp.float32)
  W_dec = tuple(w * (cy[layer:] / cx[layer])[None, :, None] for layer, w in enumerate(clt.W_dec))
  return clt.replace(
    b_enc=clt.b_enc * cx[:, None], threshold=clt.threshold * cx[:, None], W_dec=W_dec, b_dec=clt.b_dec * cy[:, None]
  )


def unfold(clt: CLT, input_scales: np.ndarray, output_scales: np.ndarray) -> CLT:
  """`fold`'s inverse."""
  cx = jnp.asarray(input_scales, jnp.float32)
  cy = jnp.asarray(output_scales, jnp.float32)
  W_dec = tuple(w / (cy[layer:] / cx[layer])[None, :, None] for layer, w in enumerate(clt.W_dec))
  return clt.replace(
    b_enc=clt.b_enc / cx[:, None], threshold=clt.threshold / cx[:, None], W_dec=W_dec, b_dec=clt.b_dec / cy[:, None]
  )
