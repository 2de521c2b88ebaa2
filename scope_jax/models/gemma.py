"""Gemma 2 / Gemma 3 text decoder in Flax NNX, with activation capture and splicing.

Shapes use letters: B batch, T query positions, S key positions, D d_model, N query heads,
K kv heads, G = N / K query heads per kv head, H head_dim, F d_ff, V vocab.
All numerics follow the public reference implementations: RMSNorm in float32 with
`(1 + scale)`, attention logits soft-capped after query scaling and before masking, softmax in
float32, GeGLU with the tanh GELU, tied unembedding with a final soft-cap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from scope_jax.models.config import SLIDING, GemmaConfig
from scope_jax.models.sites import Site
from scope_jax.parallel.precision import einsum, matmul

# Logical axis names of every parameter, by its attribute name (see parallel.mesh).
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
  "embed": ("vocab", None),
  "scale": (None,),
  "q": (None, "heads", None),
  "k": (None, "kv_heads", None),
  "v": (None, "kv_heads", None),
  "o": ("heads", None, None),
  "gate": (None, "ff"),
  "up": (None, "ff"),
  "down": ("ff", None),
}

ReplaceFn = Callable[[jax.Array], jax.Array]
BLOCK_SITES = ("att", "mlp_in", "mlp", "res")  # the sites of a block, in the order it computes them


@dataclasses.dataclass(frozen=True)
class FromSite:
  """A replacement read from an earlier site of the same block: the replaced site's activation
  becomes `fn(activation at source, its own activation)`. A transcoder is spliced this way,
  `mlp.L <- fn(mlp_in.L, mlp.L)`: `lambda x, _: predict(x)`, or with its error term kept,
  `lambda x, y: predict(x) + stop_gradient(y - predict(x))`. The source's activation is the one the
  forward carried on (itself replaced, if it was). `source` is a site name (`"mlp_in.3"`) or a
  `Site`; the object is hashable, as jit's static arguments must be."""

  source: str | Site
  fn: Callable[[jax.Array, jax.Array], jax.Array]


Replacement = ReplaceFn | FromSite


def _param(shape: tuple[int, ...], dtype) -> nnx.Param:
  # Values always come from a checkpoint; zeros keep abstract (eval_shape) construction cheap.
  return nnx.Param(jnp.zeros(shape, dtype))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype):
    self.scale = _param((dim,), dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float, scale: float) -> jax.Array:
  """Rotary embedding, rotate-half convention; angles in float32."""
  h = x_btnh.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)) / scale
  angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
  angles_bth = jnp.concatenate([angles_bth, angles_bth], axis=-1)
  cos, sin = jnp.cos(angles_bth)[:, :, None, :], jnp.sin(angles_bth)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x_btnh * cos.astype(x_btnh.dtype) + rotated * sin.astype(x_btnh.dtype)).astype(x_btnh.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nnx.Module):
  def __init__(self, config: GemmaConfig, layer: int, dtype):
    c = config
    self.q = _param((c.d_model, c.n_heads, c.head_dim), dtype)
    self.k = _param((c.d_model, c.n_kv_heads, c.head_dim), dtype)
    self.v = _param((c.d_model, c.n_kv_heads, c.head_dim), dtype)
    self.o = _param((c.n_heads, c.head_dim, c.d_model), dtype)
    if c.qk_norm:
      self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
      self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
    self.config = c
    self.sliding = c.layer_types[layer] == SLIDING

  def heads(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
    """Per-head attention outputs before W_O, concatenated: [B, T, N*H] (the `att` site)."""
    c = self.config
    q = einsum("btd,dnh->btnh", x_btd, self.q[...])
    k = einsum("bsd,dkh->bskh", x_btd, self.k[...])
    v = einsum("bsd,dkh->bskh", x_btd, self.v[...])
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    theta, scale = (
      (c.rope_theta_local, c.rope_scale_local) if self.sliding else (c.rope_theta_global, c.rope_scale_global)
    )
    q, k = rope(q, positions_bt, theta, scale), rope(k, positions_bt, theta, scale)
    b, t, n, h = q.shape
    q = q.reshape(b, t, c.n_kv_heads, n // c.n_kv_heads, h)  # head n = k * G + g
    logits = einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = softcap(logits * c.query_pre_attn_scalar**-0.5, c.attn_logit_softcap)
    qpos, kpos = positions_bt[:, None, None, :, None], positions_bt[:, None, None, None, :]
    visible = kpos <= qpos
    if self.sliding and c.sliding_window is not None:
      visible &= qpos - kpos < c.sliding_window
    logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n * h)

  def project_out(self, heads_btf: jax.Array) -> jax.Array:
    b, t, _ = heads_btf.shape
    c = self.config
    return einsum("btnh,nhd->btd", heads_btf.reshape(b, t, c.n_heads, c.head_dim), self.o[...])


class MLP(nnx.Module):
  def __init__(self, config: GemmaConfig, dtype):
    self.gate = _param((config.d_model, config.d_ff), dtype)
    self.up = _param((config.d_model, config.d_ff), dtype)
    self.down = _param((config.d_ff, config.d_model), dtype)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    gate_btf = jax.nn.gelu(matmul(x_btd, self.gate[...]), approximate=True)
    return matmul(gate_btf * matmul(x_btd, self.up[...]), self.down[...])


class Block(nnx.Module):
  def __init__(self, config: GemmaConfig, layer: int, dtype):
    eps = config.rms_norm_eps
    self.pre_attn_norm = RMSNorm(config.d_model, eps, dtype)
    self.attn = Attention(config, layer, dtype)
    self.post_attn_norm = RMSNorm(config.d_model, eps, dtype)
    self.pre_ffw_norm = RMSNorm(config.d_model, eps, dtype)
    self.mlp = MLP(config, dtype)
    self.post_ffw_norm = RMSNorm(config.d_model, eps, dtype)

  def advance(self, kind: str, resid_btd: jax.Array, act: jax.Array | None, positions_bt: jax.Array):
    """One stage of the block: (residual, previous site's activation) -> the same after site `kind`.

    The block is the chain of its sites, each computed from the one before: `att` (heads, from the
    block's input), `mlp_in` (the residual gains the attention output), `mlp`, `res` (the residual
    gains the MLP output). The residual at a site is what the rest of the block needs beside it,
    so a forward can stop at any site and resume there with a replaced activation.
    """
    if kind == "att":
      return resid_btd, self.attn.heads(self.pre_attn_norm(resid_btd), positions_bt)
    if kind == "mlp_in":
      resid_btd = resid_btd + self.post_attn_norm(self.attn.project_out(act))
      return resid_btd, self.pre_ffw_norm(resid_btd)
    if kind == "mlp":
      return resid_btd, self.post_ffw_norm(self.mlp(act))
    resid_btd = resid_btd + act
    return resid_btd, resid_btd

  def __call__(self, x_btd, positions_bt, capture: set[str], replace: Mapping[str, Replacement]):
    """One residual block; returns (new residual, {kind: captured activation})."""
    captured, carried = {}, {}
    resid_btd, act = x_btd, None
    for kind in BLOCK_SITES:
      resid_btd, act = self.advance(kind, resid_btd, act, positions_bt)
      if kind in capture:
        captured[kind] = act
      fn = replace.get(kind)
      if isinstance(fn, FromSite):
        act = fn.fn(carried[fn.source.kind], act).astype(act.dtype)
      elif fn is not None:
        act = fn(act).astype(act.dtype)
      carried[kind] = act
    return act, captured


class Gemma(nnx.Module):
  """The decoder. `__call__` runs up to the deepest captured layer, or through the unembedding;
  `token_losses` gives the next-token losses; `to_site` / `losses_from_site` split a forward at a site."""

  def __init__(self, config: GemmaConfig, dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    self.embed = _param((config.vocab_size, config.d_model), dtype)
    self.layers = nnx.List([Block(config, i, dtype) for i in range(config.n_layers)])
    self.final_norm = RMSNorm(config.d_model, config.rms_norm_eps, dtype)

  def __call__(
    self,
    tokens_bt: jax.Array,
    *,
    capture: tuple[Site, ...] = (),
    replace: Mapping[Site, Replacement] | None = None,
    with_logits: bool = True,
  ):
    """Returns (logits [B, T, V] float32 or None, {Site: activation [B, T, width]})."""
    last = self.config.n_layers - 1 if with_logits else max(s.layer for s in capture)
    x_btd, acts = self._layers(tokens_bt, capture, replace, last)
    return (self.unembed(x_btd) if with_logits else None), acts

  def _layers(self, tokens_bt, capture: tuple[Site, ...], replace: Mapping[Site, Replacement] | None, last: int):
    """Embedding and layers 0..last: (the residual after them, {Site: captured activation})."""
    replace = dict(replace or {})
    positions_bt, x_btd = self._positions(tokens_bt), self._embed(tokens_bt)
    acts = {}
    for i in range(last + 1):
      kinds = {s.kind for s in capture if s.layer == i}
      fns = {s.kind: fn for s, fn in replace.items() if s.layer == i}
      x_btd, captured = self.layers[i](x_btd, positions_bt, kinds, fns)
      acts.update({Site(kind, i): act for kind, act in captured.items()})
    return x_btd, acts

  def unembed(self, x_btd: jax.Array) -> jax.Array:
    """Final norm and tied unembedding: logits `[B, T, V]` float32."""
    x_btd = self.final_norm(x_btd)
    logits = einsum("btd,vd->btv", x_btd, self.embed[...], preferred_element_type=jnp.float32)
    return softcap(logits, self.config.final_logit_softcap)

  def token_losses(self, tokens_bt: jax.Array, replace: Mapping[Site, Replacement] | None = None) -> jax.Array:
    """Next-token cross-entropy `[B, T-1]` float32 of the (spliced) forward."""
    x_btd, _ = self._layers(tokens_bt, (), replace, self.config.n_layers - 1)
    return self.next_token_losses(x_btd, tokens_bt)

  def next_token_losses(self, x_btd: jax.Array, tokens_bt: jax.Array, vocab_chunk: int = 16_384) -> jax.Array:
    """`-log p(token[t+1])` `[B, T-1]` float32 from the last layer's residual, without ever holding
    the `[B, T, V]` logits: logsumexp is accumulated over vocabulary chunks (online, max-shifted)
    and the target's logit is one dot product. With a 262K vocabulary the logits of one eval batch
    are gigabytes; reading them back for a softmax cost as much again as the matmul."""
    c = self.config
    x_btd = self.final_norm(x_btd)[:, :-1]
    embed_vd = self.embed[...]
    target_bt = softcap(
      einsum("btd,btd->bt", x_btd, embed_vd[tokens_bt[:, 1:]], preferred_element_type=jnp.float32),
      c.final_logit_softcap,
    )
    vocab = embed_vd.shape[0]
    chunk = max(k for k in range(1, min(vocab_chunk, vocab) + 1) if vocab % k == 0)

    def add_chunk(carry, embed_cd):
      max_bt, sum_bt = carry
      logits_btc = softcap(
        einsum("btd,cd->btc", x_btd, embed_cd, preferred_element_type=jnp.float32), c.final_logit_softcap
      )
      new_max_bt = jnp.maximum(max_bt, jnp.max(logits_btc, axis=-1))
      sum_bt = sum_bt * jnp.exp(max_bt - new_max_bt) + jnp.sum(jnp.exp(logits_btc - new_max_bt[..., None]), axis=-1)
      return (new_max_bt, sum_bt), None

    init = (jnp.full(target_bt.shape, -jnp.inf, jnp.float32), jnp.zeros(target_bt.shape, jnp.float32))
    (max_bt, sum_bt), _ = jax.lax.scan(add_chunk, init, embed_vd.reshape(vocab // chunk, chunk, -1))
    return max_bt + jnp.log(sum_bt) - target_bt

  def _positions(self, tokens_bt: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)

  def _embed(self, tokens_bt: jax.Array) -> jax.Array:
    x_btd = self.embed[...][tokens_bt]
    return x_btd * jnp.asarray(self.config.d_model**0.5, x_btd.dtype)

  def to_site(self, tokens_bt: jax.Array, site: Site) -> tuple[jax.Array, jax.Array]:
    """The forward up to `site`: (the residual there, the site's activation)."""
    x_btd, _ = self._layers(tokens_bt, (), None, site.layer - 1)
    positions_bt, block, act = self._positions(tokens_bt), self.layers[site.layer], None
    for kind in BLOCK_SITES[: BLOCK_SITES.index(site.kind) + 1]:
      x_btd, act = block.advance(kind, x_btd, act, positions_bt)
    return x_btd, act

  def between(self, resid_btd: jax.Array, act: jax.Array, start: Site, stop: Site) -> tuple[jax.Array, jax.Array]:
    """The forward from `start` (its residual and (replaced) activation, as `to_site` gives them) to
    the later site `stop`: (the residual there, `stop`'s activation). A replacement model that
    splices at several sites in turn (a CLT, whose layer t reads what it wrote at every layer before)
    is these segments in sequence."""
    if (stop.layer, BLOCK_SITES.index(stop.kind)) <= (start.layer, BLOCK_SITES.index(start.kind)):
      raise ValueError(f"between: {stop.name} does not come after {start.name}")
    positions_bt = self._positions(resid_btd[..., 0])
    for layer in range(start.layer, stop.layer + 1):
      kinds = BLOCK_SITES[BLOCK_SITES.index(start.kind) + 1 if layer == start.layer else 0 :]
      kinds = kinds[: kinds.index(stop.kind) + 1] if layer == stop.layer else kinds
      for kind in kinds:
        resid_btd, act = self.layers[layer].advance(kind, resid_btd, act, positions_bt)
    return resid_btd, act

  def resid_from_site(self, resid_btd: jax.Array, act: jax.Array, site: Site) -> jax.Array:
    """The forward from `site` on, given `to_site`'s residual and a (replaced) activation: the
    residual after the last layer `[B, T, d]` (before the final norm)."""
    positions_bt = self._positions(resid_btd[..., 0])
    block = self.layers[site.layer]
    for kind in BLOCK_SITES[BLOCK_SITES.index(site.kind) + 1 :]:
      resid_btd, act = block.advance(kind, resid_btd, act, positions_bt)
    x_btd = act
    for i in range(site.layer + 1, self.config.n_layers):
      x_btd, _ = self.layers[i](x_btd, positions_bt, set(), {})
    return x_btd

  def losses_from_site(self, resid_btd: jax.Array, act: jax.Array, site: Site, tokens_bt: jax.Array) -> jax.Array:
    """The forward from `site` on (`resid_from_site`): the next-token losses `[B, T-1]`."""
    return self.next_token_losses(self.resid_from_site(resid_btd, act, site), tokens_bt)
