"""TopK and BatchTopK SAEs in the blocked step: the selection, exact on a sharded latent axis, and AuxK.

The recipes, as the reference implementations write them (OpenAI's sparse_autoencoder, SAELens 6,
sparsify; docs/recipe.md §13):

- Pre-activations `z = W_enc (x - b_dec) + b_enc` (a transcoder: no `b_dec` on its input). TopK
  keeps each token's k largest, ReLU'd; BatchTopK the k·B largest ReLU'd values of the whole
  global batch of B tokens (a token's count varies; the mean is k). `yhat = W_dec f + b_dec`.
- The loss is the reconstruction's (Matryoshka: summed over the prefixes), with the selection held
  fixed in the backward pass (∂f/∂z = 1 on the kept latents, 0 elsewhere): no sparsity term, no
  threshold to train.
- AuxK (Gao et al. 2024): the dead latents' k_aux largest ReLU'd pre-activations per token decode
  the residual the live ones left, without `b_dec` (sparsify's PR #134 fixed its decoding with
  it); α · min(dead / k_aux, 1) · ||e - ehat||² / ||y - ȳ||² (the target's variance over the
  batch, as sparsify divides), α = 1/32 and k_aux = d_out / 2 by default. Its values are ReLU'd
  as OpenAI's and sparsify's are (SAELens decodes raw pre-activations, negative ones included).
- BatchTopK's release threshold θ: an exponential moving average (rate `recipe.threshold_ema`,
  SAELens' `topk_threshold_lr` 0.01) of the smallest value the batch kept, one θ for every
  latent, as SAELens and dictionary_learning both keep it (Bussmann et al.'s rule); it lives in
  the `threshold` leaf, so export releases the SAE as a JumpReLU with it (folded like any θ).

How the step finds them: pass 1 runs the encoder over every block and keeps the local pre-
activations (the thresholds need every latent of a row); the thresholds come from sae/topk.py's
bisection with counts summed over `model` (and `data` for BatchTopK), so a sharded latent axis
selects exactly what one device would; the decoder then runs on the kept values. Pass 2
(`step.update_sae`) forms each block's gradients from the same values and thresholds. The sparse
step lists the kept and AuxK entries of every block and forms both passes from them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from scope_jax.data.batch import Batch
from scope_jax.parallel.mesh import DATA, MODEL
from scope_jax.parallel.precision import matmul
from scope_jax.sae.loss import LossSpec
from scope_jax.sae.topk import as_float, kth_largest_bits, relu_bits
from scope_jax.train import sparse, step
from scope_jax.train.params import TrainParams

F32, I32 = jnp.float32, jnp.int32


class Selection(NamedTuple):
  """One SAE's choice of latents on the local rows: a latent is kept on row b where its value is
  at least `tau_b[b]` and positive; a dead one is in the row's AuxK set where its value is at least
  `aux_tau_b[b]` and positive (and `aux_on`: some latent is dead)."""

  tau_b: jax.Array  # [B]
  aux_tau_b: jax.Array  # [B]
  dead_m: jax.Array  # [M_local] bool
  aux_on: jax.Array  # bool
  aux_scale: jax.Array  # min(dead / k_aux, 1)

  def masks(self, pre_bk: jax.Array, j, block: int) -> tuple[jax.Array, jax.Array]:
    """(kept, AuxK) `[B, block]` for latent block j."""
    dead_k = lax.dynamic_slice_in_dim(self.dead_m, j * block, block)
    positive = pre_bk > 0
    kept = (pre_bk >= self.tau_b[:, None]) & positive
    aux = dead_k & (pre_bk >= self.aux_tau_b[:, None]) & positive & self.aux_on
    return kept, aux

  def entry_masks(self, row_c, latent_c, pre_c) -> tuple[jax.Array, jax.Array]:
    """(kept, AuxK) of entries (row, local latent, value)."""
    positive = pre_c > 0
    kept = (pre_c >= self.tau_b[row_c]) & positive
    aux = self.dead_m[latent_c] & (pre_c >= self.aux_tau_b[row_c]) & positive & self.aux_on
    return kept, aux


def aux_width(spec: LossSpec, d_out: int) -> int:
  """k_aux: `spec.auxk_k`, or half the reconstructed width (Gao et al.'s heuristic)."""
  return spec.auxk_k or max(1, d_out // 2)


def select(pre_jbk: jax.Array, k, dead_m: jax.Array, spec: LossSpec, batch_size: int, d_out: int) -> Selection:
  """The thresholds of one SAE from every local pre-activation `[blocks, B, block]`: per row (TopK,
  `k` kept latents) or one for the global batch (BatchTopK, `k`·`batch_size`), and AuxK's per row."""
  blocks, rows, block = pre_jbk.shape
  bits_jbk = relu_bits(pre_jbk)

  def row_count(bits, t_b):
    return lax.psum(jnp.sum(bits >= t_b[None, :, None], axis=(0, 2), dtype=I32), MODEL)

  if spec.activation == "topk":
    tau_b = as_float(kth_largest_bits(lambda t_b: row_count(bits_jbk, t_b), (rows,), k))
  else:
    # Counts summed in float32 stay exact for this comparison: every term is an integer below
    # 2^24 and k·batch is too (config.py refuses more), so a rounded sum can only be wrong where
    # it is past k·batch anyway.
    total = lambda t: lax.psum(jnp.sum(row_count(bits_jbk, jnp.full((rows,), t)).astype(F32)), DATA)
    tau_b = jnp.full((rows,), as_float(kth_largest_bits(total, (), k * F32(batch_size))))
  n_dead = lax.psum(jnp.sum(dead_m, dtype=I32), MODEL)
  k_aux = aux_width(spec, d_out)
  aux_on = (n_dead > 0) & (spec.auxk_coefficient > 0)
  dead_jbk = dead_m.reshape(blocks, 1, block)

  def aux_threshold():
    aux_bits = jnp.where(dead_jbk, bits_jbk, jnp.uint32(0))
    return as_float(kth_largest_bits(lambda t_b: row_count(aux_bits, t_b), (rows,), jnp.minimum(k_aux, n_dead)))

  aux_tau_b = lax.cond(aux_on, aux_threshold, lambda: jnp.zeros((rows,), F32))
  return Selection(tau_b, aux_tau_b, dead_m, aux_on, jnp.minimum(n_dead / k_aux, 1.0).astype(F32))


def encode_all(group: TrainParams, s, x_bd: jax.Array, block: int, spec: LossSpec) -> jax.Array:
  """Every local pre-activation of SAE s, `[blocks, B, block]`."""

  def body(j, pre_jbk):
    return pre_jbk.at[j].set(step.block_pre(step.block_of(group, s, j, block), x_bd, spec.pre_bias))

  return lax.fori_loop(0, group.width // block, body, jnp.zeros((group.width // block, x_bd.shape[0], block), F32))


def decode(group: TrainParams, s, pre_jbk: jax.Array, sel: Selection, block: int, spec: LossSpec) -> step.Forward:
  """Pass 1's decoding for SAE s from its kept values: each prefix's decoding of the kept latents
  and AuxK's decoding of its dead ones."""
  yhat_pbd, l0_b, slots_b, no_frequency = step.empty_forward(group, pre_jbk.shape[1], spec)
  aux = spec.auxk_coefficient > 0

  def body(j, carry):
    yhat_pbd, ehat_bd, l0_b, slots_b = carry
    blk, pre_bk = step.block_of(group, s, j, block), pre_jbk[j]
    kept_bk, aux_bk = sel.masks(pre_bk, j, block)
    p = step.prefix_of(j, block, group.width, spec.prefixes) if len(spec.prefixes) > 1 else 0
    yhat_pbd = step.add_to_prefixes(yhat_pbd, matmul(jnp.where(kept_bk, pre_bk, 0.0), blk.W_dec), p)
    if aux:
      with_aux = lambda: ehat_bd + matmul(jnp.where(aux_bk, pre_bk, 0.0), blk.W_dec)
      ehat_bd = lax.cond(sel.aux_on, with_aux, lambda: ehat_bd)
    counted = l0_b + jnp.sum(kept_bk, axis=-1, dtype=F32), slots_b + jnp.sum(kept_bk | aux_bk, axis=-1, dtype=I32)
    return (yhat_pbd, ehat_bd, *counted)

  ehat_bd = jnp.zeros(yhat_pbd.shape[1:], F32) if aux else None
  yhat_pbd, ehat_bd, l0_b, slots_b = lax.fori_loop(0, group.width // block, body, (yhat_pbd, ehat_bd, l0_b, slots_b))
  return step.Forward(yhat_pbd, l0_b, slots_b, no_frequency, pre_jbk, ehat_bd, sel.aux_scale)


def dense_gradients(x_bd: jax.Array, spec: LossSpec, pre_jbk: jax.Array, sel: Selection) -> step.BlockGradients:
  """A block's gradients from its kept values: ∂pre = ∂f on the kept latents, plus AuxK's ∂ehat
  on the block's AuxK latents; the decoder's from both; θ has none."""

  def gradients(blk: TrainParams, j, c: step.BlockCotangents):
    pre_bk = pre_jbk[j]
    kept_bk, aux_bk = sel.masks(pre_bk, j, blk.width)
    dpre_bk = jnp.where(kept_bk, matmul(c.derr_bd, blk.W_dec.T), 0.0)
    g_dec_kd = matmul(jnp.where(kept_bk, pre_bk, 0.0).T, c.derr_bd)
    if c.daux_bd is not None:

      def with_aux():
        daux_pre_bk = jnp.where(aux_bk, matmul(c.daux_bd, blk.W_dec.T), 0.0)
        return dpre_bk + daux_pre_bk, g_dec_kd + matmul(jnp.where(aux_bk, pre_bk, 0.0).T, c.daux_bd)

      dpre_bk, g_dec_kd = lax.cond(sel.aux_on, with_aux, lambda: (dpre_bk, g_dec_kd))
    fired_k = jnp.sum(kept_bk, axis=0, dtype=I32)
    return _assemble(blk, g_dec_kd, matmul(dpre_bk.T, x_bd), jnp.sum(dpre_bk, axis=0), fired_k, spec)

  return gradients


def _assemble(blk: TrainParams, g_dec_kd, dpre_x_kd, db_enc_k, fired_k, spec: LossSpec):
  """`step.assemble` of a block's local sums (θ has no gradient; `fired_k`: rows each latent was kept on)."""
  zero = jnp.zeros((), F32)
  local = {
    "W_dec": g_dec_kd,
    "dpre_x": dpre_x_kd,
    "b_enc": db_enc_k,
    "threshold": jnp.zeros_like(blk.threshold),
    "fired": fired_k,
    "in_window": zero,
    "dead_loss": zero,
  }
  return step.assemble(blk, local, spec.pre_bias)


# ------------------------------------------------------------------ the sparse step


def find_entries(pre_jbk: jax.Array, sel: Selection, capacity: int) -> tuple[sparse.Slots, jax.Array, jax.Array]:
  """Every block's kept and AuxK entries (row, latent, value), grouped by block, at most
  `capacity` per row (the step falls back where a row has more); (entries, kept per row (float),
  entries per row)."""
  blocks, rows, block = pre_jbk.shape
  n = rows * capacity + sparse.CHUNK
  slots = sparse.Slots(jnp.zeros(n, I32), jnp.zeros(n, I32), jnp.zeros(n, F32), jnp.zeros(blocks + 1, I32))

  def body(j, carry):
    slots, l0_b, slots_b = carry
    kept_bk, aux_bk = sel.masks(pre_jbk[j], j, block)
    slots, n_b = sparse.append(slots, j, pre_jbk[j], kept_bk | aux_bk)
    return slots, l0_b + jnp.sum(kept_bk, axis=-1, dtype=F32), slots_b + n_b

  return lax.fori_loop(0, blocks, body, (slots, jnp.zeros((rows,), F32), jnp.zeros((rows,), I32)))


def reconstruct_from(
  group: TrainParams, s, slots: sparse.Slots, sel: Selection, spec: LossSpec, rows: int, block: int, aux: bool
) -> tuple[jax.Array, jax.Array | None]:
  """(each prefix's decoding `[P, B, d_out]`, AuxK's `[B, d_out]` or None) from the entries."""
  d_out = group.W_dec.shape[-1]

  def add(row_c, latent_c, pre_c, valid_c, carry):
    yhat_bd, ehat_bd = carry
    kept_c, aux_c = sel.entry_masks(row_c, latent_c, pre_c)
    to_c = jnp.where(valid_c, row_c, rows)
    w_cd = group.W_dec[s, latent_c]
    yhat_bd = yhat_bd.at[to_c].add(jnp.where(kept_c, pre_c, 0.0)[:, None] * w_cd, mode="drop")
    if ehat_bd is not None:
      ehat_bd = ehat_bd.at[to_c].add(jnp.where(aux_c, pre_c, 0.0)[:, None] * w_cd, mode="drop")
    return yhat_bd, ehat_bd

  # Entries are in latent order, so each Matryoshka prefix's are a prefix of them.
  carry, start, totals = (jnp.zeros((rows, d_out), F32), jnp.zeros((rows, d_out), F32) if aux else None), 0, []
  offset = lax.axis_index(MODEL) * group.width
  blocks = group.width // block
  for end_latent in spec.prefixes[:-1] or ():
    end = slots.start_j[jnp.clip((end_latent - offset) // block, 0, blocks)]
    carry, start = sparse.over(slots, start, end, add, carry), end
    totals.append(carry[0])
  carry = sparse.over(slots, start, slots.start_j[-1], add, carry)
  return jnp.stack([*totals, carry[0]]), carry[1]


def gradients_from(slots: sparse.Slots, x_bd: jax.Array, spec: LossSpec, sel: Selection) -> step.BlockGradients:
  """A block's gradients (as `dense_gradients` forms them) from its entries."""

  def gradients(blk: TrainParams, j, c: step.BlockCotangents):
    k, d_out = blk.W_dec.shape

    def add(row_c, latent_c, pre_c, valid_c, carry):
      g_dec_kd, g_enc_kd, g_b_k, fired_k = carry
      kept_c, aux_c = sel.entry_masks(row_c, latent_c, pre_c)
      kept_c, aux_c = kept_c & valid_c, aux_c & valid_c
      local_c = latent_c - j * k
      w_cd = blk.W_dec[local_c]
      derr_cd = c.derr_bd[row_c]
      dpre_c = jnp.where(kept_c, jnp.sum(derr_cd * w_cd, axis=-1), 0.0)
      g_dec_cd = jnp.where(kept_c, pre_c, 0.0)[:, None] * derr_cd
      if c.daux_bd is not None:
        daux_cd = c.daux_bd[row_c]
        dpre_c += jnp.where(aux_c, jnp.sum(daux_cd * w_cd, axis=-1), 0.0)
        g_dec_cd += jnp.where(aux_c, pre_c, 0.0)[:, None] * daux_cd
      to_c = jnp.where(valid_c, local_c, k)
      scatter = lambda a, v: a.at[to_c].add(v, mode="drop")
      return (
        scatter(g_dec_kd, g_dec_cd),
        scatter(g_enc_kd, dpre_c[:, None] * x_bd[row_c]),
        scatter(g_b_k, dpre_c),
        scatter(fired_k, kept_c.astype(I32)),
      )

    init = (jnp.zeros((k, d_out), F32), jnp.zeros_like(blk.W_enc), jnp.zeros((k,), F32), jnp.zeros((k,), I32))
    g_dec_kd, g_enc_kd, g_b_k, fired_k = sparse.over(slots, slots.start_j[j], slots.start_j[j + 1], add, init)
    return _assemble(blk, g_dec_kd, g_enc_kd, g_b_k, fired_k, spec)

  return gradients


# ------------------------------------------------------------------ the step


def train_sae(
  group: TrainParams,
  moments: dict,
  s,
  rows: Batch,
  scalars: step.Scalars,
  dead_m: jax.Array,
  spec: step.StepSpec,
  capacity: int = 0,
) -> tuple[TrainParams, dict, dict]:
  """One step of TopK or BatchTopK SAE s of a stacked group on the local `rows`: dense, or (with
  `capacity` entries per row) sparse wherever no row of the global batch has more. BatchTopK's θ
  then moves toward the smallest kept value. Statistics as `step.update_sae`'s, plus `sparse`."""
  loss, block, x_bd = spec.loss, spec.block, rows.x_bd
  pre_jbk = encode_all(group, s, x_bd, block, loss)
  sel = select(pre_jbk, scalars.k, dead_m, loss, spec.batch_size, group.W_dec.shape[-1])
  dense = lambda: decode(group, s, pre_jbk, sel, block, loss)
  dense_grads = dense_gradients(x_bd, loss, pre_jbk, sel)
  if capacity:
    slots, l0_b, slots_b = find_entries(pre_jbk, sel, capacity)
    too_many = lax.pmax(jnp.max(lax.psum(slots_b, MODEL)), DATA) > capacity
    aux = loss.auxk_coefficient > 0

    def from_entries():
      yhat_pbd, ehat_bd = reconstruct_from(group, s, slots, sel, loss, x_bd.shape[0], block, aux)
      return step.Forward(yhat_pbd, l0_b, slots_b, jnp.zeros((0,), F32), pre_jbk, ehat_bd, sel.aux_scale)

    # as in train/sparse.py: chosen per pass and per block, never around the whole update
    forward = lax.cond(too_many, dense, from_entries)
    sparse_grads = gradients_from(slots, x_bd, loss, sel)
    gradients = lambda *args: lax.cond(too_many, dense_grads, sparse_grads, *args)
    ran_sparse = 1.0 - too_many.astype(F32)
  else:
    forward, gradients, ran_sparse = dense(), dense_grads, jnp.zeros((), F32)
  group, moments, stats = step.update_sae(group, moments, s, rows, forward, gradients, scalars, dead_m, spec)
  if loss.activation == "batchtopk":
    theta_m = _moved_threshold(group.threshold[s], sel, spec.threshold_ema)
    group = group.replace(threshold=group.threshold.at[s].set(theta_m))
  return group, moments, stats | {"sparse": ran_sparse}


def _moved_threshold(threshold_m: jax.Array, sel: Selection, rate: float) -> jax.Array:
  """BatchTopK's θ (every latent's the same) one EMA step toward the smallest value the batch
  kept, which is its threshold τ itself (a value of the batch, found bit for bit); a batch with
  fewer than k·B positive values kept them all and leaves θ as it was."""
  low = sel.tau_b[0]
  return jnp.where(low > 0, (1.0 - rate) * threshold_m + rate * low, threshold_m)
