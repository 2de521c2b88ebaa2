"""One JumpReLU training step, blocked over latents (docs/recipe.md §1–2).

The step never holds a `[batch, latents]` array nor a params-sized gradient:

- pass 1 walks the latents a block at a time and sums the reconstruction `f @ W_dec`
  (`reconstruct`);
- pass 2 walks them again, recomputes each block's pre-activations, forms the block's gradients
  (the pseudo-derivatives of docs/recipe.md §1, written out by hand: `block_gradients`) and
  applies Adam, the decoder-gradient projection and the row renormalization to that block in
  place (`update_sae`).

`update_sae` takes pass 1's result and the way a block's gradients are formed, so the sparse step
(train/sparse.py) shares everything after them with this one.

Lazy Adam (`recipe.lazy_adam`): the update reads and writes only the latents that may have a
gradient (`touched`), `UPDATE_ROWS` rows at a time, gathered from the latent-major arrays
(train/params.py); a skipped latent's parameters are what the dense update would leave (β1 = 0)
and its second moments catch up on the skipped steps' β2 decay when it is next touched
(`Adam.catch_up`, bookkept in `latent_step`).

With `recipe.clip_grad_norm` a pass between the two forms every block's gradient to sum its
squares (`gradient_norm`): the clip factor must be known before the first block is updated.
Where one SAE's gradient fits the tiling's `gradient_bytes` (train/tiling.py) the pass keeps the
blocks' gradients and the update scales them by the clip factor instead of forming them again
from the clipped cotangents (the same gradient to rounding: scaled after the matmuls, not
before); otherwise the pass discards them and the clipped step costs ~1.5× the unclipped one.

Peak memory is params + Adam moments + batch plus a few `[rows, block]` temporaries. The price
is one extra encoder matmul (12·d·M FLOPs per token where 10 suffice); on CPU it is repaid
because every elementwise pass runs on a block that is still in cache. Where memory allows (GPU,
TPU) pass 1 keeps the pre-activations and pass 2 reads them instead (train/tiling.py).

The functions see one device's share of a stacked group — rows `[B_local, d]`, latents
`[M_local]` — and `psum` batch sums over `data` and latent sums over `model`;
`stacked.make_train_step` runs them under `shard_map`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from scope_jax.data.batch import Batch
from scope_jax.parallel.mesh import DATA, MODEL
from scope_jax.parallel.precision import matmul
from scope_jax.sae.loss import LossSpec
from scope_jax.train.optim import Adam, project_rows
from scope_jax.train.params import LATENT_LEAVES, TrainParams
from scope_jax.train.tiling import keeps_gradients

F32, I32 = jnp.float32, jnp.int32
UPDATE_ROWS = 64  # latents per gather/scatter chunk of the update
STAT_NAMES = (
  "loss",
  "mse",
  "auxk_loss",
  "l0",
  "sparsity_loss",
  "frequency_loss",
  "dead_latent_loss",
  "grad_norm",
  "window_fraction",
  "slots_max",
  "sparse",
)  # per SAE, besides fired_m


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What a group's step is built with and never changes during a run."""

  loss: LossSpec
  adam: Adam
  block: int  # latents per block of the blocked passes (train/tiling.py)
  batch_size: int  # rows of the global batch (the local rows are a share of it)
  gradient_bytes: int = 0  # under clipping, one SAE's local gradient up to this size is kept (train/tiling.py)
  threshold_ema: float = 0.0  # BatchTopK: the rate its released θ follows the smallest kept value (train/topk.py)

  def keeps_gradients(self, group: TrainParams) -> bool:
    """Whether the clipping pass keeps a group's block gradients for the update to read."""
    d_in, d_out = group.W_enc.shape[-1], group.W_dec.shape[-1]
    return keeps_gradients(self.gradient_bytes, self.adam.clip_norm, group.width, d_in, d_out)


class Scalars(NamedTuple):
  """What changes from one step to the next, or from one SAE of a group to the next: λ after its
  warm-up, the learning rate, Adam's step count t (from 1), and TopK's k (`[S]` for a group, a
  scalar for one SAE: λ and k; a JumpReLU's k is 0, a TopK's λ is)."""

  lam: jax.Array
  lr: jax.Array
  t: jax.Array
  k: jax.Array


class Forward(NamedTuple):
  """Pass 1 of a step on the local rows and latents: the reconstruction `Σ f @ W_dec` of each
  prefix `[P, B, d_out]` (P = 1: the whole width), active latents per row `[B]` (float), slots
  (latents with a gradient) per row `[B]`, and rows each local latent is active on `[M_local]`
  (float; `[0]` unless the frequency penalty needs it); and, when kept for pass 2 (train/tiling.py),
  every block's pre-activations `[blocks, B, block]`. With AuxK (train/topk.py): the dead latents'
  reconstruction of the residual `ehat_bd` (local latents' share, no `b_dec`) and its loss's scale."""

  yhat_pbd: jax.Array
  l0_b: jax.Array
  slots_b: jax.Array
  fired_m: jax.Array
  pre_jbk: jax.Array | None = None
  ehat_bd: jax.Array | None = None
  aux_scale: jax.Array | None = None


class Cotangents(NamedTuple):
  """∂loss/∂ what pass 1 computed, for one SAE: `dyhat_pbd` `[P, B, d_out]`, ∂loss/∂yhat summed
  over prefix p and every wider one (what the latents of prefix p's last block see);
  `dpenalty_b` ∂loss/∂||f||₀ per row; `pull_m` `[M_local]` c / batch on dead latents, else 0;
  `dfreq_m` `[M_local]` ∂loss/∂(firing count) of the frequency penalty, or None; `daux_bd`
  `[B, d_out]` ∂loss/∂ehat of AuxK, or None. Every gradient of the step is linear in them, so
  scaling them scales it (gradient clipping)."""

  dyhat_pbd: jax.Array
  dpenalty_b: jax.Array
  pull_m: jax.Array
  dfreq_m: jax.Array | None
  daux_bd: jax.Array | None = None

  def scaled(self, c: jax.Array) -> Cotangents:
    return jax.tree.map(lambda a: a * c, self)

  def block(self, j, block: int, prefixes: tuple[int, ...]) -> BlockCotangents:
    """What latent block j's gradients are formed from."""
    cut = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, j * block, block)
    if len(prefixes) > 1:
      derr_bd = self.dyhat_pbd[prefix_of(j, block, self.pull_m.shape[0], prefixes)]
    else:
      derr_bd = self.dyhat_pbd[0]
    return BlockCotangents(derr_bd, self.dpenalty_b, cut(self.pull_m), cut(self.dfreq_m), self.daux_bd)


class BlockCotangents(NamedTuple):
  """`Cotangents` as one latent block sees them: ∂loss/∂yhat `[B, d]` (its prefix's), ∂loss/∂||f||₀
  `[B]`, the dead latents' pull `[block]`, the frequency penalty's `[block]` or None, AuxK's
  ∂loss/∂ehat `[B, d]` or None."""

  derr_bd: jax.Array
  dpenalty_b: jax.Array
  pull_k: jax.Array
  dfreq_k: jax.Array | None
  daux_bd: jax.Array | None


# (block's parameters, j, its cotangents) -> (gradients, fired, sums)
BlockGradients = Callable[[TrainParams, jax.Array, BlockCotangents], tuple[TrainParams, jax.Array, dict]]


def prefix_of(j, block: int, width_local: int, prefixes: tuple[int, ...]) -> jax.Array:
  """The first Matryoshka prefix holding latent block j of this device (latents are split over
  `model` in order); blocks never straddle a prefix boundary (the tiling's block divides them)."""
  start = lax.axis_index(MODEL) * width_local + j * block
  return jnp.sum(start >= jnp.asarray(prefixes[:-1], I32), dtype=I32)


def _cut(a: jax.Array, s, j, block: int) -> jax.Array:
  """Latent block j of SAE s of a stacked latent-major array `[S, M, ...]`."""
  return lax.dynamic_slice(a, (s, j * block) + (0,) * (a.ndim - 2), (1, block, *a.shape[2:]))[0]


def block_of(group: TrainParams, s, j, block: int) -> TrainParams:
  """Latent block j of SAE s of a stacked group (its `b_dec` whole, no skip)."""
  return TrainParams(b_dec=group.b_dec[s], **{name: _cut(getattr(group, name), s, j, block) for name in LATENT_LEAVES})


def block_pre(blk: TrainParams, x_bd: jax.Array, pre_bias: bool = True) -> jax.Array:
  """Pre-activations `[B, block]`; an SAE's pre-encoder bias folded into the bias."""
  return matmul(x_bd, blk.W_enc.T) + ((blk.b_enc - matmul(blk.W_enc, blk.b_dec)) if pre_bias else blk.b_enc)


def candidates(pre_bk: jax.Array, theta_k: jax.Array, bandwidth: float) -> tuple[jax.Array, jax.Array]:
  """(active `pre > θ`, inside the kernel window `|pre - θ| < ε/2`): the only (row, latent) pairs
  with a non-zero gradient (docs/recipe.md §1). Both steps decide with these expressions."""
  return pre_bk > theta_k, jnp.abs(pre_bk - theta_k) < bandwidth / 2


def add_to_prefixes(yhat_pbd: jax.Array, part_bd: jax.Array, p) -> jax.Array:
  """`part_bd` (a block's `f @ W_dec`) added to the reconstructions of prefix `p` and wider."""
  if yhat_pbd.shape[0] == 1:
    return yhat_pbd + part_bd
  return jnp.where((jnp.arange(yhat_pbd.shape[0]) >= p)[:, None, None], yhat_pbd + part_bd, yhat_pbd)


def empty_forward(group: TrainParams, rows: int, spec: LossSpec) -> tuple:
  """Pass 1's sums before the first block: (yhat_pbd, l0_b, slots_b, fired_m)."""
  d_out = group.W_dec.shape[-1]
  counted = group.width if spec.frequency_scale else 0
  return (
    jnp.zeros((max(1, len(spec.prefixes)), rows, d_out), F32),
    jnp.zeros((rows,), F32),
    jnp.zeros((rows,), I32),
    jnp.zeros((counted,), F32),
  )


def count_fired(fired_m: jax.Array, active_bk: jax.Array, j, block: int) -> jax.Array:
  """Rows each latent of block j is active on, written into `fired_m` when it is counted."""
  if fired_m.shape[0] == 0:
    return fired_m
  return lax.dynamic_update_slice_in_dim(fired_m, jnp.sum(active_bk, axis=0, dtype=F32), j * block, 0)


def reconstruct(group: TrainParams, s, x_bd: jax.Array, block: int, spec: LossSpec, keep_pre: bool = False) -> Forward:
  """Pass 1 for SAE s on the local latents: each prefix's `Σ f @ W_dec`, active latents and slots
  (active or in-window latents) per row, (frequency penalty) rows per latent, and with `keep_pre`
  every block's pre-activations. Pass 2 updates block j only after reading it, and `b_dec` after
  every block, so the kept values are the ones pass 2 would recompute."""
  blocks = group.width // block

  def body(j, carry):
    yhat_pbd, l0_b, slots_b, fired_m, pre_jbk = carry
    blk = block_of(group, s, j, block)
    pre_bk = block_pre(blk, x_bd, spec.pre_bias)
    active_bk, in_window_bk = candidates(pre_bk, blk.threshold, spec.bandwidth)
    p = prefix_of(j, block, group.width, spec.prefixes) if len(spec.prefixes) > 1 else 0
    return (
      add_to_prefixes(yhat_pbd, matmul(jnp.where(active_bk, pre_bk, 0.0), blk.W_dec), p),
      l0_b + jnp.sum(active_bk, axis=-1, dtype=F32),
      slots_b + jnp.sum(active_bk | in_window_bk, axis=-1, dtype=jnp.int32),
      count_fired(fired_m, active_bk, j, block),
      None if pre_jbk is None else pre_jbk.at[j].set(pre_bk),
    )

  pre_jbk = jnp.zeros((blocks, x_bd.shape[0], block), F32) if keep_pre else None
  init = (*empty_forward(group, x_bd.shape[0], spec), pre_jbk)
  return Forward(*lax.fori_loop(0, blocks, body, init))


def block_gradients(
  blk: TrainParams,
  x_bd: jax.Array,
  derr_bd: jax.Array,
  dpenalty_b: jax.Array,
  spec: LossSpec,
  pull_k: jax.Array,
  dfreq_k: jax.Array | None = None,
  pre_bk: jax.Array | None = None,
) -> tuple[TrainParams, jax.Array, dict]:
  """Gradients of a latent block's parameters, summed over the whole batch, which of its latents
  fired, and sums for statistics: pre-activations inside the kernel window (the only ones that
  train θ) and the dead latents' pre-activation loss. `derr_bd` = ∂loss/∂yhat, `dpenalty_b` =
  ∂loss/∂||f||₀ per row, `pull_k` `[block]` = c / batch for dead latents and 0 for the others
  (sae/loss.py's last term), `dfreq_k` the frequency penalty's ∂loss/∂H per latent (or None).
  The `b_dec` field holds this block's share of the pre-encoder-bias gradient (`-W_enc_k @ db_enc_k`);
  `pre_bk`: the block's pre-activations when pass 1 kept them, else recomputed."""
  theta_k, bandwidth = blk.threshold, spec.bandwidth
  pre_bk = block_pre(blk, x_bd, spec.pre_bias) if pre_bk is None else pre_bk
  active_bk, in_window_bk = candidates(pre_bk, theta_k, bandwidth)
  df_bk = matmul(derr_bd, blk.W_dec.T)
  pull_bk = jnp.where(active_bk, 0.0, pull_k)  # ∂/∂θ of c·relu(θ - z) on dead latents
  dpre_bk = jnp.where(active_bk, df_bk, 0.0) - pull_bk  # ∂JumpReLU/∂z = H(z - θ)
  dstep_bk = dpenalty_b[:, None] if dfreq_k is None else dpenalty_b[:, None] + dfreq_k
  dtheta_bk = -(theta_k / bandwidth) * df_bk - dstep_bk / bandwidth
  return assemble(
    blk,
    {
      "W_dec": matmul(jnp.where(active_bk, pre_bk, 0.0).T, derr_bd),
      "dpre_x": matmul(dpre_bk.T, x_bd),
      "b_enc": jnp.sum(dpre_bk, axis=0),
      "threshold": jnp.sum(jnp.where(in_window_bk, dtheta_bk, 0.0) + pull_bk, axis=0),
      "fired": jnp.sum(active_bk, axis=0, dtype=jnp.int32),
      "in_window": jnp.sum(in_window_bk, dtype=F32),
      "dead_loss": jnp.sum(pull_bk * (theta_k - pre_bk)),
    },
    spec.pre_bias,
  )


def assemble(blk: TrainParams, local: dict, pre_bias: bool = True) -> tuple[TrainParams, jax.Array, dict]:
  """A block's (gradients, fired latents, statistics) from its sums over the local rows: `dpre_x`
  = ∂preᵀ x `[block, d]`, `W_dec` = fᵀ ∂yhat, `b_enc`, `threshold`, `fired` (counts), `in_window`,
  `dead_loss`. Summed over `data` here; an SAE's pre-encoder bias adds its share to ∂W_enc."""
  sums = lax.psum(local, DATA)
  if pre_bias:
    g_enc, g_dec_bias = sums["dpre_x"] - jnp.outer(sums["b_enc"], blk.b_dec), -matmul(sums["b_enc"], blk.W_enc)
  else:
    g_enc, g_dec_bias = sums["dpre_x"], jnp.zeros_like(blk.b_dec)
  grads = TrainParams(
    W_enc=g_enc,
    b_enc=sums["b_enc"],
    W_dec=sums["W_dec"],
    b_dec=g_dec_bias,
    threshold=sums["threshold"],
  )
  return grads, sums["fired"] > 0, {"in_window": sums["in_window"], "dead_loss": sums["dead_loss"]}


def touched(g: TrainParams, fired_k: jax.Array) -> jax.Array:
  """`[block]` bool: the latents that may have a non-zero gradient. With β1 = 0 Adam leaves every
  other latent's parameters bit for bit and only multiplies its second moments by β2, which the
  lazy update defers (`update_rows`). A latent that fired on no row has zero ∂W_dec (f = 0) and
  ∂pre only from the dead-latent pull, which also makes its ∂b_enc = -rows·pull non-zero; so
  firing, ∂b_enc and ∂θ decide without reading the `[block, d]` gradients."""
  return fired_k | (g.b_enc != 0) | (g.threshold != 0)


def update_rows(
  group: TrainParams, moments: dict, s, j, block: int, g: TrainParams, update_k, adam: Adam, t, lr
) -> tuple[TrainParams, dict]:
  """Adam, the renormalization of the decoder rows it moved and θ ≥ 0 for the latents of block j
  marked in `update_k`, written in place `UPDATE_ROWS` latents at a time. Their moments first
  catch up on the steps they skipped (`moments["latent_step"]`, see `Adam.catch_up`); the other
  latents are not read or written. `g`: the block's gradients, the decoder's already projected."""
  ids_u = jnp.nonzero(update_k, size=block + UPDATE_ROWS, fill_value=block)[0]
  step = t.astype(I32)

  def chunk(c, carry):
    group, moments = carry
    i_u = lax.dynamic_slice_in_dim(ids_u, c * UPDATE_ROWS, UPDATE_ROWS)
    at_u = jnp.where(i_u < block, j * block + i_u, group.width)  # padding: past the end, dropped
    rows = lambda a: a.at[s, at_u].get(mode="clip")
    write = lambda a, v: a.at[s, at_u].set(v, mode="drop")
    skipped_u = t - 1 - rows(moments["latent_step"])
    new = {}
    for name in LATENT_LEAVES:
      g_u = getattr(g, name).at[i_u].get(mode="clip")
      leaf_moments = {k: rows(getattr(moments[k], name)) for k in adam.moment_names}
      m_u = adam.moments(g_u, adam.catch_up(leaf_moments, skipped_u))
      new[name] = adam.apply(rows(getattr(group, name)), g_u, m_u, t, lr)
      moments = moments | {k: moments[k].replace(**{name: write(getattr(moments[k], name), m_u[k])}) for k in m_u}
    # A row Adam left as it was (a zero decoder gradient: the latent neither fired nor decoded for
    # AuxK) kept its unit norm: it stays bit for bit, as the lazy update leaves an untouched latent.
    moved_u = jnp.any(new["W_dec"] != rows(group.W_dec), axis=-1, keepdims=True)
    renormalized = new["W_dec"] / jnp.linalg.norm(new["W_dec"], axis=-1, keepdims=True)
    new["W_dec"] = jnp.where(moved_u, renormalized, new["W_dec"])
    new["threshold"] = jnp.maximum(new["threshold"], 0.0)
    group = group.replace(**{name: write(getattr(group, name), new[name]) for name in LATENT_LEAVES})
    return group, moments | {"latent_step": write(moments["latent_step"], step)}

  chunks = (jnp.sum(update_k, dtype=I32) + UPDATE_ROWS - 1) // UPDATE_ROWS
  return lax.fori_loop(0, chunks, chunk, (group, moments))


def _latent_sq_norm(g: TrainParams) -> jax.Array:
  """Σ g² over a block's per-latent leaves (`b_dec`'s share is summed separately, once per SAE)."""
  return sum(jnp.sum(jnp.square(getattr(g, k))) for k in LATENT_LEAVES)


def _dense_gradients(x_bd: jax.Array, dyhat_bd: jax.Array, db_dec_shares_d: jax.Array, skip: bool) -> dict:
  """The gradients of the leaves every latent shares, from ∂loss/∂yhat over all prefixes: `b_dec`
  (plus the blocks' pre-encoder-bias shares, summed over `model`) and a skip-transcoder's `W_skip`."""
  out = {"b_dec": lax.psum(db_dec_shares_d, MODEL) + lax.psum(jnp.sum(dyhat_bd, axis=0), DATA)}
  if skip:
    out["W_skip"] = lax.psum(matmul(x_bd.T, dyhat_bd), DATA)
  return out


def gradient_norm(
  group: TrainParams,
  s,
  x_bd: jax.Array,
  cot: Cotangents,
  gradients: BlockGradients,
  block: int,
  spec: LossSpec,
  keep: bool = False,
) -> tuple[jax.Array, tuple | None]:
  """(the global norm of SAE s's gradient (every leaf), by a pass that forms each block's
  gradients: the norm must be known before the first block is updated; with `keep`, what that
  pass formed, every block's `(gradients, fired, sums)` stacked `[blocks, ...]`, else None)."""
  blocks = group.width // block

  def body(j, carry):
    sq_sum, db_dec_d, kept = carry
    formed = gradients(block_of(group, s, j, block), j, cot.block(j, block, spec.prefixes))
    if kept is not None:
      kept = jax.tree.map(lambda stack, value: stack.at[j].set(value), kept, formed)
    return sq_sum + _latent_sq_norm(formed[0]), db_dec_d + formed[0].b_dec, kept

  kept = None
  if keep:  # shaped as one block's (gradients, fired, sums), one per block
    like = block_of(group, s, 0, block)
    sums = {"in_window": jnp.zeros((blocks,), F32), "dead_loss": jnp.zeros((blocks,), F32)}
    kept = (jax.tree.map(lambda a: jnp.zeros((blocks, *a.shape), F32), like), jnp.zeros((blocks, block), bool), sums)
  init = (jnp.zeros((), F32), jnp.zeros_like(group.b_dec[s]), kept)
  sq_sum, db_dec_d, kept = lax.fori_loop(0, blocks, body, init)
  shared = _dense_gradients(x_bd, cot.dyhat_pbd[0], db_dec_d, group.W_skip is not None)
  return jnp.sqrt(lax.psum(sq_sum, MODEL) + sum(jnp.sum(jnp.square(g)) for g in shared.values())), kept


def _update_shared(group: TrainParams, moments: dict, s, grads: dict, adam: Adam, t, lr) -> tuple[TrainParams, dict]:
  """Adam on SAE s's shared leaves (`b_dec`, `W_skip`): every step, every entry."""
  for name, g in grads.items():
    m = adam.moments(g, {k: getattr(moments[k], name)[s] for k in adam.moment_names})
    group = group.replace(**{name: getattr(group, name).at[s].set(adam.apply(getattr(group, name)[s], g, m, t, lr))})
    moments = moments | {k: moments[k].replace(**{name: getattr(moments[k], name).at[s].set(v)}) for k, v in m.items()}
  return group, moments


def update_sae(
  group: TrainParams,
  moments: dict,
  s,
  rows: Batch,
  forward: Forward,
  gradients: BlockGradients,
  scalars: Scalars,
  dead_m: jax.Array,
  spec: StepSpec,
) -> tuple[TrainParams, dict, dict]:
  """Passes 2 (and with clipping 1½) of SAE s's step on the local `rows` given pass 1 (`forward`)
  and a way to form a block's gradients (the dense `block_gradients` or the sparse step's): every
  block's gradients formed and applied in place (Adam, decoder-gradient projection,
  renormalization, θ ≥ 0), then `b_dec` and a skip-transcoder's `W_skip`. `dead_m` `[M_local]`
  marks the dead latents (for the dead-latent loss).

  Returns (group, moments, SAE s's statistics: STAT_NAMES — window_fraction is the fraction of
  pre-activations inside the threshold's kernel window — and fired_m).
  """
  loss, adam, block, batch = spec.loss, spec.adam, spec.block, spec.batch_size
  (lam, lr, t), x_bd, y_bd = scalars[:3], rows.x_bd, rows.targets_bd
  yhat_pbd, l0_b, slots_b = lax.psum((forward.yhat_pbd, forward.l0_b, forward.slots_b), MODEL)
  err_pbd = yhat_pbd + (group.b_dec[s] + (0.0 if group.W_skip is None else matmul(x_bd, group.W_skip[s]))) - y_bd
  # ∂loss/∂yhat_p = (2/batch)·err_p; the latents of prefix p feed every prefix from p on
  dyhat_pbd = (2.0 / batch) * (jnp.cumsum(err_pbd[::-1], axis=0)[::-1] if err_pbd.shape[0] > 1 else err_pbd)
  frequency_m = lax.psum(forward.fired_m, DATA) / batch  # [M_local] firing frequency, or [0]
  dfreq_m = None
  if loss.frequency_scale:  # ∂/∂H_bi of (λ/s)·Σ_i p_i², p_i = Σ_b H_bi / batch
    dfreq_m = (2.0 * lam / (loss.frequency_scale * batch)) * frequency_m
  aux_loss, daux_bd = jnp.zeros((), F32), None
  if forward.ehat_bd is not None:
    aux_loss, daux_bd = auxk_cotangent(forward, err_pbd[-1], y_bd, loss.auxk_coefficient, batch)
  cot = Cotangents(
    dyhat_pbd,
    (lam / batch) * loss.penalty_slope(l0_b),
    jnp.where(dead_m, loss.dead_latent_loss / batch, 0.0),
    dfreq_m,
    daux_bd,
  )
  clip, kept = jnp.ones((), F32), None
  if adam.clip_norm:
    norm, kept = gradient_norm(group, s, x_bd, cot, gradients, block, loss, spec.keeps_gradients(group))
    clip = jnp.minimum(1.0, adam.clip_norm / norm)
    cot = cot.scaled(clip)

  def block_gradients_at(blk: TrainParams, j) -> tuple[TrainParams, jax.Array, dict]:
    """Block j's clipped gradients: formed from the clipped cotangents, or the kept ones scaled
    (every gradient and the dead-latent loss are linear in the cotangents)."""
    if kept is None:
      return gradients(blk, j, cot.block(j, block, loss.prefixes))
    g, fired_k, sums_k = jax.tree.map(lambda stack: stack[j], kept)
    return jax.tree.map(lambda a: a * clip, g), fired_k, sums_k | {"dead_loss": sums_k["dead_loss"] * clip}

  def update(j, carry):
    group, moments, db_dec_d, sq_sum, sums, fired_m = carry
    blk = block_of(group, s, j, block)
    g, fired_k, sums_k = block_gradients_at(blk, j)
    sq_sum += _latent_sq_norm(g)
    g = g.replace(W_dec=project_rows(g.W_dec, blk.W_dec))
    update_k = touched(g, fired_k) if adam.lazy else jnp.ones_like(fired_k)
    group, moments = update_rows(group, moments, s, j, block, g, update_k, adam, t, lr)
    return (
      group,
      moments,
      db_dec_d + g.b_dec,
      sq_sum,
      jax.tree.map(jnp.add, sums, sums_k),
      lax.dynamic_update_slice_in_dim(fired_m, fired_k, j * block, 0),
    )

  zero = jnp.zeros((), F32)
  init = (
    group,
    moments,
    jnp.zeros_like(group.b_dec[s]),
    zero,
    {"in_window": zero, "dead_loss": zero},
    jnp.zeros(group.b_enc.shape[1:], bool),
  )
  group, moments, db_dec_d, sq_sum, sums, fired_m = lax.fori_loop(0, group.width // block, update, init)
  sums = lax.psum(sums, MODEL)
  shared = _dense_gradients(x_bd, cot.dyhat_pbd[0], db_dec_d, group.W_skip is not None)
  group, moments = _update_shared(group, moments, s, shared, adam, t, lr)

  totals = lax.psum(
    {
      "sq_err_p": jnp.sum(jnp.square(err_pbd), axis=(1, 2)),
      "l0": jnp.sum(l0_b),
      "penalty": jnp.sum(loss.penalty(l0_b)),
    },
    DATA,
  )
  mse_p, sparsity = totals["sq_err_p"] / batch, totals["penalty"] / batch
  frequency = lax.psum(jnp.sum(jnp.square(frequency_m)), MODEL) / loss.frequency_scale if dfreq_m is not None else zero
  stats = {
    "loss": jnp.sum(mse_p) + lam * (sparsity + frequency) + sums["dead_loss"] / clip + aux_loss,
    "auxk_loss": aux_loss,
    "mse": mse_p[-1],  # the whole width's
    "l0": totals["l0"] / batch,
    "sparsity_loss": sparsity,
    "frequency_loss": frequency,
    "dead_latent_loss": sums["dead_loss"] / clip,  # its sum was taken with the clipped pull
    "grad_norm": jnp.sqrt(lax.psum(sq_sum, MODEL) + sum(jnp.sum(jnp.square(g)) for g in shared.values())) / clip,
    # in float: batch × width overflows int32 from B 4,096 × 512K latents
    "window_fraction": sums["in_window"] / (float(batch) * lax.psum(group.width, MODEL)),
    "slots_max": lax.pmax(jnp.max(slots_b), DATA).astype(F32),
    "fired_m": fired_m,
  }
  return group, moments, stats


def auxk_cotangent(forward: Forward, err_bd: jax.Array, y_bd: jax.Array, coefficient: float, batch: int):
  """(AuxK's loss, its ∂/∂ehat `[B, d_out]`) on the local rows (Gao et al. 2024, as sparsify writes it):
  α · scale · mean_b ||ehat_b - e_b||² / mean_b ||y_b - ȳ||², where e = y - yhat is the residual
  the live latents left (a constant: no gradient reaches yhat through it), ehat the dead latents'
  decoding without `b_dec` (the residual already lacks it) and scale = min(dead / k_aux, 1)."""
  ehat_bd = lax.psum(forward.ehat_bd, MODEL)
  y_mean_d = lax.psum(jnp.sum(y_bd, axis=0), DATA) / batch
  variance = lax.psum(jnp.sum(jnp.square(y_bd - y_mean_d)), DATA) / batch
  coef = coefficient * forward.aux_scale / variance
  miss_bd = ehat_bd + err_bd  # ehat - e, since err = yhat - y = -e
  return coef * lax.psum(jnp.sum(jnp.square(miss_bd)), DATA) / batch, (2.0 * coef / batch) * miss_bd


def dense_gradients(x_bd: jax.Array, spec: LossSpec, pre_jbk: jax.Array | None = None) -> BlockGradients:
  """The dense step's `BlockGradients`, reading pass 1's pre-activations `pre_jbk` when it kept them."""
  return lambda blk, j, c: block_gradients(
    blk, x_bd, c.derr_bd, c.dpenalty_b, spec, c.pull_k, c.dfreq_k, None if pre_jbk is None else pre_jbk[j]
  )


def train_sae(
  group: TrainParams, moments: dict, s, rows: Batch, scalars: Scalars, dead_m: jax.Array, spec: StepSpec, keep_pre=False
) -> tuple[TrainParams, dict, dict]:
  """The dense step of SAE s of a stacked group on the local `rows` of a global batch, with pass
  1's pre-activations kept for pass 2 when `keep_pre`. Statistics as `update_sae`'s, plus
  `sparse` (0: this step)."""
  forward = reconstruct(group, s, rows.x_bd, spec.block, spec.loss, keep_pre)
  gradients = dense_gradients(rows.x_bd, spec.loss, forward.pre_jbk)
  group, moments, stats = update_sae(group, moments, s, rows, forward, gradients, scalars, dead_m, spec)
  return group, moments, stats | {"sparse": jnp.zeros((), F32)}


TrainSAE = Callable[..., tuple[TrainParams, dict, dict]]  # train_sae's signature


def train_group(
  group: TrainParams, moments: dict, rows: Batch, scalars: Scalars, dead_sm: jax.Array, train_one: TrainSAE
) -> tuple[TrainParams, dict, dict]:
  """One step of every SAE of a stacked group, one after another on the same rows (a `vmap`
  would make XLA copy the group's arrays instead of updating them in place), each by `train_one`
  (`train_sae` or `sparse.train_sae` with its `StepSpec` bound); `scalars.lam` `[S]`. Statistics `[S]`."""
  n = group.W_enc.shape[0]
  stats = {k: jnp.zeros((n,), F32) for k in STAT_NAMES}
  stats["fired_m"] = jnp.zeros(group.b_enc.shape, bool)

  def one(s, carry):
    group, moments, stats = carry
    one_sae = scalars._replace(lam=scalars.lam[s], k=scalars.k[s])
    group, moments, stats_s = train_one(group, moments, s, rows, one_sae, dead_sm[s])
    return group, moments, {k: v.at[s].set(stats_s[k]) for k, v in stats.items()}

  return lax.fori_loop(0, n, one, (group, moments, stats))
