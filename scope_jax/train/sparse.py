"""The exact sparse training step: the dense step's result from the pairs that have a gradient.

With the pseudo-derivatives of docs/recipe.md §1 a (row, latent) pair contributes to the gradient
only where the latent is active (`pre > θ`: ∂pre, ∂W_enc, ∂W_dec, ∂b_enc) or its pre-activation is
inside the kernel window (`|pre - θ| < ε/2`: ∂θ). A trained JumpReLU SAE has ~20–200 of these
*slots* per token out of 16 K–1 M latents. This step

1. runs the encoder densely, block by block as the dense step does (the same `_pre` on the same
   blocks, so it decides with the same float values), and lists each block's slots as *entries*
   (row, latent, pre-activation), grouped by block (`find_slots`); then sums the reconstruction
   from the entries in one pass;
2. forms each block's gradients from its entries by gathers and scatter-adds of `d`-wide rows
   (`block_gradients_from`), and applies Adam, the projection and the renormalization exactly as
   the dense step does (`step.update_sae`, the same code).

The dead latents' pre-activation loss (sae/loss.py) is dense in rows: every non-active row pulls.
Its gradients are the dense ones rewritten as a sum over the active rows minus a rank-one
correction from `Σ_b x_b`, so they too cost only the entries.

Shapes stay static: a per-token capacity K bounds the entries (`rows × K`); where any token of
the global batch has more slots the step runs the dense step instead (`lax.cond`), so every
step is exact. Entries are found in a block's `[rows, block]` tile by packing the candidates
into 32-bit words and peeling the lowest set bit per row, one bit per row per iteration.

Cost per token: the encoder's 2·d·M FLOPs (dense), then a few `d`-wide gathers and scatters per
slot; the dense step costs 12–14·d·M (benchmarks/README.md has the measured figures).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from scope_jax.data.batch import Batch
from scope_jax.parallel.mesh import DATA, MODEL
from scope_jax.parallel.precision import matmul
from scope_jax.sae.loss import LossSpec
from scope_jax.train import step
from scope_jax.train.params import TrainParams

F32, I32, U32 = jnp.float32, jnp.int32, jnp.uint32
CHUNK = 256  # entries per gather/scatter chunk: measured fastest of 256-2,048 at d 640 and 2,304


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  """The local slots of one SAE as entries grouped by latent block: those of block j are
  `[start_j[j], start_j[j + 1])`. Arrays are `CHUNK` longer than the capacity so that a chunk
  read never runs past the end."""

  row_n: jax.Array  # [N + CHUNK] int32: the entry's local row
  latent_n: jax.Array  # [N + CHUNK] int32: its latent (of the local ones)
  pre_n: jax.Array  # [N + CHUNK] float32: its pre-activation
  start_j: jax.Array  # [blocks + 1] int32


def _pack(mask_bk: jax.Array) -> jax.Array:
  """`[rows, k]` bool -> `[rows, ⌈k/32⌉]` uint32, latent i at bit i % 32 of word i // 32."""
  rows, k = mask_bk.shape
  words = -(-k // 32)
  mask = jnp.pad(mask_bk, ((0, 0), (0, 32 * words - k))).reshape(rows, words, 32).astype(U32)
  return jnp.sum(mask << jnp.arange(32, dtype=U32), axis=-1, dtype=U32)


def append(slots: Slots, j, pre_bk: jax.Array, candidate_bk: jax.Array) -> tuple[Slots, jax.Array]:
  """Block j's candidates appended as entries, row by row in latent order; and their count per
  row `[rows]`. Entries past the capacity are dropped (the step then falls back)."""
  rows, k = pre_bk.shape
  capacity = slots.row_n.shape[0] - CHUNK
  words_bw = _pack(candidate_bk)
  n_b = jnp.sum(lax.population_count(words_bw), axis=-1, dtype=I32)
  start = slots.start_j[j]
  first_b = start + jnp.cumsum(n_b) - n_b  # where row b's entries of this block begin
  row_ids = jnp.arange(rows, dtype=I32)
  word_ids = jnp.arange(words_bw.shape[1], dtype=I32)

  def peel(t, carry):
    """Each row's lowest remaining candidate becomes its entry number t."""
    words_bw, row_n, latent_n, pre_n = carry
    w_b = jnp.argmax(words_bw != 0, axis=-1).astype(I32)
    word_b = jnp.take_along_axis(words_bw, w_b[:, None], axis=-1)[:, 0]
    lowest_b = word_b & (~word_b + U32(1))
    latent_b = jnp.minimum(32 * w_b + lax.population_count(lowest_b - U32(1)).astype(I32), k - 1)
    at_b = jnp.where((t < n_b) & (first_b + t < capacity), first_b + t, capacity + CHUNK)  # else dropped
    pre_b = jnp.take_along_axis(pre_bk, latent_b[:, None], axis=-1)[:, 0]
    words_bw = jnp.where(word_ids == w_b[:, None], (word_b & (word_b - U32(1)))[:, None], words_bw)
    return (
      words_bw,
      row_n.at[at_b].set(row_ids, mode="drop"),
      latent_n.at[at_b].set(j * k + latent_b, mode="drop"),
      pre_n.at[at_b].set(pre_b, mode="drop"),
    )

  _, row_n, latent_n, pre_n = lax.fori_loop(0, jnp.max(n_b), peel, (words_bw, slots.row_n, slots.latent_n, slots.pre_n))
  end = jnp.minimum(start + jnp.sum(n_b), capacity)
  return Slots(row_n, latent_n, pre_n, slots.start_j.at[j + 1].set(end)), n_b


def _chunk(slots: Slots, start, end) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(rows, latents, pre-activations, valid) of the `CHUNK` entries from `start`; valid before `end`."""
  take = lambda a: lax.dynamic_slice_in_dim(a, start, CHUNK)
  return take(slots.row_n), take(slots.latent_n), take(slots.pre_n), start + jnp.arange(CHUNK) < end


def over(slots: Slots, start, end, body, init):
  """`body(row_c, latent_c, pre_c, valid_c, carry)` over entries `[start, end)`, `CHUNK` at a time."""
  chunks = (end - start + CHUNK - 1) // CHUNK
  return lax.fori_loop(0, chunks, lambda c, carry: body(*_chunk(slots, start + c * CHUNK, end), carry), init)


def find_slots(
  group: TrainParams, s, x_bd: jax.Array, block: int, capacity: int, spec: LossSpec
) -> tuple[step.Forward, Slots]:
  """Pass 1 of the sparse step for SAE s on the local rows and latents: (the dense pass 1's
  `Forward` — each prefix's reconstruction summed from the entries — and the entries). At most
  `capacity` entries per row fit; `Forward.slots_b` says whether a row had more."""
  rows = x_bd.shape[0]
  blocks = group.width // block
  n = rows * capacity + CHUNK
  slots = Slots(jnp.zeros(n, I32), jnp.zeros(n, I32), jnp.zeros(n, F32), jnp.zeros(blocks + 1, I32))

  def body(j, carry):
    l0_b, slots_b, fired_m, slots = carry
    blk = step.block_of(group, s, j, block)
    pre_bk = step.block_pre(blk, x_bd, spec.pre_bias)
    active_bk, in_window_bk = step.candidates(pre_bk, blk.threshold, spec.bandwidth)
    slots, n_b = append(slots, j, pre_bk, active_bk | in_window_bk)
    fired_m = step.count_fired(fired_m, active_bk, j, block)
    return l0_b + jnp.sum(active_bk, axis=-1, dtype=F32), slots_b + n_b, fired_m, slots

  yhat_pbd, l0_b, slots_b, fired_m = step.empty_forward(group, rows, spec)
  l0_b, slots_b, fired_m, slots = lax.fori_loop(0, blocks, body, (l0_b, slots_b, fired_m, slots))

  def add(row_c, latent_c, pre_c, valid_c, yhat_bd):
    f_c = jnp.where(valid_c & (pre_c > group.threshold[s, latent_c]), pre_c, 0.0)
    return yhat_bd.at[jnp.where(valid_c, row_c, rows)].add(f_c[:, None] * group.W_dec[s, latent_c], mode="drop")

  # Entries are in latent order, so each Matryoshka prefix's are a prefix of them: sum the
  # segments between consecutive prefix ends, keeping each running total.
  yhat_bd, start, totals = yhat_pbd[0], 0, []
  offset = lax.axis_index(MODEL) * group.width
  for end_latent in spec.prefixes[:-1] or ():
    end = slots.start_j[jnp.clip((end_latent - offset) // block, 0, blocks)]
    yhat_bd, start = over(slots, start, end, add, yhat_bd), end
    totals.append(yhat_bd)
  totals.append(over(slots, start, slots.start_j[-1], add, yhat_bd))
  return step.Forward(jnp.stack(totals), l0_b, slots_b, fired_m), slots


def block_gradients_from(slots: Slots, x_bd: jax.Array, spec: LossSpec) -> step.BlockGradients:
  """A block's gradients (as `step.block_gradients` gives them) from its entries; with the
  dead-latent loss on, its every-row terms are added."""
  rows, bandwidth = x_bd.shape[0], spec.bandwidth
  x_sum_d = jnp.sum(x_bd, axis=0)  # for the dead latents' pull on every non-active row

  def gradients(blk: TrainParams, j, cot: step.BlockCotangents):
    derr_bd, dpenalty_b, pull_k, dfreq_k = cot.derr_bd, cot.dpenalty_b, cot.pull_k, cot.dfreq_k
    k, d_out = blk.W_dec.shape

    def add(row_c, latent_c, pre_c, valid_c, carry):
      g_dec_kd, g_enc_kd, g_b_k, g_theta_k, fired_k, active_pre_k, in_window = carry
      latent_c = latent_c - j * k  # within the block
      theta_c = blk.threshold[latent_c]
      active_c, in_window_c = step.candidates(pre_c, theta_c, bandwidth)
      active_c, in_window_c = active_c & valid_c, in_window_c & valid_c
      derr_cd = derr_bd[row_c]
      df_c = jnp.sum(derr_cd * blk.W_dec[latent_c], axis=-1)
      # dense: dpre = H·df - (1 - H)·pull, summed over every row; here H·(df + pull) over the
      # entries, and -pull·Σ_b x_b after the loop
      dpre_c = jnp.where(active_c, df_c + pull_k[latent_c], 0.0)
      dstep_c = dpenalty_b[row_c] if dfreq_k is None else dpenalty_b[row_c] + dfreq_k[latent_c]
      dtheta_c = jnp.where(in_window_c, -(theta_c / bandwidth) * df_c - dstep_c / bandwidth, 0.0)
      f_c = jnp.where(active_c, pre_c, 0.0)
      to_c = jnp.where(valid_c, latent_c, k)
      scatter = lambda a, v: a.at[to_c].add(v, mode="drop")
      return (
        scatter(g_dec_kd, f_c[:, None] * derr_cd),
        scatter(g_enc_kd, dpre_c[:, None] * x_bd[row_c]),
        scatter(g_b_k, dpre_c),
        scatter(g_theta_k, dtheta_c),
        scatter(fired_k, active_c.astype(I32)),
        scatter(active_pre_k, f_c),
        in_window + jnp.sum(in_window_c, dtype=F32),
      )

    zeros_k = jnp.zeros((k,), F32)
    init = (
      jnp.zeros((k, d_out), F32),
      jnp.zeros_like(blk.W_enc),
      zeros_k,
      zeros_k,
      jnp.zeros((k,), I32),
      zeros_k,
      F32(0),
    )
    start, end = slots.start_j[j], slots.start_j[j + 1]
    g_dec_kd, g_enc_kd, g_b_k, g_theta_k, fired_k, active_pre_k, in_window = over(slots, start, end, add, init)
    local = {"W_dec": g_dec_kd, "fired": fired_k, "in_window": in_window}
    if not spec.dead_latent_loss:
      zero = jnp.zeros((), F32)
      sums = {"dpre_x": g_enc_kd, "b_enc": g_b_k, "threshold": g_theta_k, "dead_loss": zero}
      return step.assemble(blk, local | sums, spec.pre_bias)
    inactive_k = rows - fired_k.astype(F32)
    bias_k = (blk.b_enc - matmul(blk.W_enc, blk.b_dec)) if spec.pre_bias else blk.b_enc
    pre_sum_k = matmul(blk.W_enc, x_sum_d) + rows * bias_k  # Σ_b pre_b, for the dead loss
    return step.assemble(
      blk,
      local
      | {
        "dpre_x": g_enc_kd - jnp.outer(pull_k, x_sum_d),
        "b_enc": g_b_k - rows * pull_k,
        "threshold": g_theta_k + pull_k * inactive_k,
        "dead_loss": jnp.sum(pull_k * (blk.threshold * inactive_k - (pre_sum_k - active_pre_k))),
      },
      spec.pre_bias,
    )

  return gradients


def train_sae(
  group: TrainParams,
  moments: dict,
  s,
  rows: Batch,
  scalars: step.Scalars,
  dead_m: jax.Array,
  spec: step.StepSpec,
  capacity: int,
) -> tuple[TrainParams, dict, dict]:
  """`step.train_sae` by the sparse step, or by the dense one where a token of the global batch has
  more than `capacity` slots (statistic `sparse` says which ran)."""
  x_bd, loss, block = rows.x_bd, spec.loss, spec.block
  forward, slots = find_slots(group, s, x_bd, block, capacity, loss)
  too_many = lax.pmax(jnp.max(lax.psum(forward.slots_b, MODEL)), DATA) > capacity
  # The choice is made per pass and per block, never around the whole update: arrays carried
  # through a `lax.cond` are copied, and the group's would double the step's memory.
  forward = lax.cond(too_many, lambda: step.reconstruct(group, s, x_bd, block, loss), lambda: forward)
  dense = step.dense_gradients(x_bd, loss)
  sparse = block_gradients_from(slots, x_bd, loss)
  gradients = lambda *args: lax.cond(too_many, dense, sparse, *args)
  group, moments, stats = step.update_sae(group, moments, s, rows, forward, gradients, scalars, dead_m, spec)
  return group, moments, stats | {"sparse": 1.0 - too_many.astype(F32)}
