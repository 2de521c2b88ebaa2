"""Training cross-layer transcoders (sae/clt.py): one jitted step updates a stack of CLTs (every
λ × seed of the sweep) on the same batch, rows sharded on `data` and latents on `model`.

The loss of one CLT, in training units (each site divided by its own C, data/normalization.py):

    loss = Σ_t mean_b ||y^t - ŷ^t||²  +  λ · mean_b Σ_ℓ Σ_i ||W_dec^ℓ_i|| · H(pre^ℓ_bi - θ^ℓ_i)
           + c · mean_b Σ_{ℓ, i dead} relu(θ^ℓ_i - pre^ℓ_bi)                 (optional, as for SAEs)

with ||W_dec^ℓ_i|| the norm of latent i's decoder concatenated over every layer it writes to (the
weighting of Anthropic's CLTs: the decoders are free, not unit-norm, so a latent cannot dodge the
penalty by shrinking its activation and growing its decoder) and H the Heaviside step with the
pseudo-derivatives of docs/recipe.md §1: the L0 term trains θ and the decoder norms.

The step, per device, under `shard_map`: the encoder once, then the local latents' share of every
ŷ^t (dense, or from each row's slots only: `sparse_write`), summed over `model`; the residual's
gradient `2 r / B` is then exact on every device and is pulled back through the local forward
with `jax.vjp` (no collective is differentiated), the penalty's gradient likewise, and the
gradients are summed over `data`. Adam (train/optim.py; dense, clipping on the global norm across
devices) and θ ≥ 0 as for SAEs. The sparse path is exact: a source layer where a local row has
more slots than the capacity takes the dense path on that device (`lax.cond`). Each CLT of the
stack is a loop iteration, not a `vmap` lane, so that the `cond` stays a branch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scope_jax.parallel.mesh import DATA, MODEL
from scope_jax.sae.clt import CLT, decoder_norms, init_clt, per_layer
from scope_jax.sae.jumprelu import heaviside, jumprelu
from scope_jax.train.optim import Adam, lr_schedule, sparsity_warmup
from scope_jax.train.stacked import Recipe

STAT_NAMES = ("loss", "mse_l", "fvu_l", "l0_l", "sparse")
GATHER_BYTES = 1 << 25  # the sparse decoder gathers at most this much of W_dec per chunk


@dataclasses.dataclass(frozen=True)
class CLTSweep:
  """A stack of CLTs of one width over the same layers: every (λ, seed) pair."""

  layers: int
  width: int  # F: latents per layer
  members: tuple[tuple[float, int], ...]  # (λ, seed)
  recipe: Recipe
  batch_size: int
  steps: int
  capacity: int = 0  # the sparse step's active latents per row and layer; 0 = the dense step

  def __post_init__(self):
    r = self.recipe
    if r.sparsity_loss != "l0" or r.frequency_scale:
      raise ValueError(
        "kind 'clt' trains with recipe.sparsity_loss 'l0' (weighted by decoder norms) and no frequency penalty; "
        f"got sparsity_loss {r.sparsity_loss!r}, frequency_scale {r.frequency_scale}"
      )
    if not 0 <= self.capacity <= self.width:
      raise ValueError(f"train.capacity {self.capacity}: expected 0 (dense) to the width {self.width}")

  @property
  def names(self) -> list[str]:
    return [f"clt-w{self.width}-l1{lam:g}-s{seed}" for lam, seed in self.members]


def param_specs() -> CLT:
  """Where each leaf of a stack of CLTs lives: latents on `model`, the rest replicated."""
  latent = P(None, None, MODEL)
  return CLT(W_enc=P(None, None, None, MODEL), b_enc=latent, threshold=latent, W_dec=P(None, MODEL), b_dec=P())


def _tree_specs(layers: int, specs: CLT) -> CLT:
  return specs.replace(W_dec=(specs.W_dec,) * layers)


def initializer(sweep: CLTSweep, mesh: Mesh, mean_ld, d_in: int):
  """`(init, shardings)`: a jitted function giving the sweep's fresh state on `mesh`, and its shardings."""
  specs = _tree_specs(sweep.layers, param_specs())
  latent = P(None, None, MODEL)
  state_specs = {
    "step": P(),
    "params": specs,
    "opt_state": {k: specs for k in sweep.recipe.adam.moment_names},
    "since_fired": latent,
    "first_bad_step": (P(),),  # one group (train/health.py `check_finite`)
  }
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs, is_leaf=lambda x: isinstance(x, P))
  mean_ld = jnp.asarray(mean_ld, jnp.float32)
  d_out = mean_ld.shape[-1]

  def init() -> dict:
    one = lambda seed: init_clt(
      jax.random.key(seed), sweep.layers, d_in, d_out, sweep.width, sweep.recipe.init_threshold, mean_ld
    )
    params = jax.tree.map(lambda *a: jnp.stack(a), *[one(seed) for _, seed in sweep.members])
    n = len(sweep.members)
    return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": {k: jax.tree.map(jnp.zeros_like, params) for k in sweep.recipe.adam.moment_names},
      "since_fired": jnp.zeros((n, sweep.layers, sweep.width), jnp.int32),
      "first_bad_step": (jnp.full((n,), -1, jnp.int32),),
    }

  return jax.jit(init, out_shardings=shardings), shardings


# ---- the sparse decoder ------------------------------------------------------------------------


def active_slots(active_bf: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each row's active latents in latent order: `idx [b, K]` (0 past the row's count), `valid
  [b, K]`, and the largest count of any row (the list is whole only when that is ≤ K)."""
  position_bf = jnp.cumsum(active_bf, axis=1, dtype=jnp.int32) - 1
  count_b = position_bf[:, -1] + 1
  slot_bf = jnp.where(active_bf & (position_bf < capacity), position_bf, capacity)
  rows = jnp.arange(active_bf.shape[0])[:, None]
  latents = jnp.broadcast_to(jnp.arange(active_bf.shape[1], dtype=jnp.int32), active_bf.shape)
  idx_bk = jnp.zeros((active_bf.shape[0], capacity + 1), jnp.int32).at[rows, slot_bf].set(latents)[:, :capacity]
  valid_bk = jnp.arange(capacity) < count_b[:, None]
  return idx_bk, valid_bk, jnp.max(count_b)


def _row_blocks(idx_bk: jax.Array, val_bk: jax.Array, n: int):
  """`(idx [blocks, r, K], val [blocks, r, K], r)`: rows in blocks whose gathered decoder rows
  (`r·K·n` floats) fit GATHER_BYTES; the last block padded with slot-less rows."""
  b, capacity = idx_bk.shape
  r = max(1, min(b, GATHER_BYTES // (4 * capacity * n)))
  pad = -b % r
  idx = jnp.pad(idx_bk, ((0, pad), (0, 0))).reshape(-1, r, capacity)
  val = jnp.pad(val_bk, ((0, pad), (0, 0))).reshape(-1, r, capacity)
  return idx, val, r


@jax.custom_vjp
def sparse_write(w_fn: jax.Array, idx_bk: jax.Array, val_bk: jax.Array) -> jax.Array:
  """`[b, n]`: Σ_k val[b, k] · w[idx[b, k]], reading only the rows named (`w [F, n]`: one source
  layer's decoder, its target layers flattened), a block of rows at a time; the backward
  scatter-adds each block into one gradient buffer."""
  b = idx_bk.shape[0]
  idx, val, _ = _row_blocks(idx_bk, val_bk, w_fn.shape[1])
  out = lax.map(lambda iv: jnp.einsum("rk,rkn->rn", iv[1], jnp.take(w_fn, iv[0], axis=0)), (idx, val))
  return out.reshape(-1, w_fn.shape[1])[:b]


def _sparse_write_fwd(w_fn, idx_bk, val_bk):
  return sparse_write(w_fn, idx_bk, val_bk), (w_fn, idx_bk, val_bk)


def _sparse_write_bwd(residuals, g_bn):
  w_fn, idx_bk, val_bk = residuals
  b, n = g_bn.shape
  idx, val, r = _row_blocks(idx_bk, val_bk, n)
  g = jnp.pad(g_bn, ((0, idx.shape[0] * r - b), (0, 0))).reshape(-1, r, n)

  def block(g_w, ivg):
    i, v, g_rn = ivg
    g_val = jnp.einsum("rn,rkn->rk", g_rn, jnp.take(w_fn, i, axis=0))
    g_w = g_w.at[i.reshape(-1)].add((v[..., None] * g_rn[:, None, :]).reshape(-1, n))
    return g_w, g_val

  g_w, g_val = lax.scan(block, jnp.zeros_like(w_fn), (idx, val, g))
  return g_w, None, g_val.reshape(-1, idx_bk.shape[1])[:b]


sparse_write.defvjp(_sparse_write_fwd, _sparse_write_bwd)


# ---- the step ----------------------------------------------------------------------------------


def _pre_lbf(p: CLT, x_lbd: jax.Array) -> jax.Array:
  return jnp.einsum("lbd,ldf->lbf", x_lbd, p.W_enc) + p.b_enc[:, None, :]


def _partial_yhat(pre_lbf: jax.Array, p: CLT, bandwidth: float, capacity: int) -> tuple[jax.Array, jax.Array]:
  """`[L, b, d]`: what this device's latents write into every layer (no `b_dec`, not yet summed
  over `model`); and how many source layers were decoded sparsely. The sparse path lists each
  row's *slots*: its active latents and those inside θ's kernel window, whose zero activation
  still passes θ a gradient (sae/jumprelu.py). A source layer takes it when no local row has more
  than `capacity` slots there (a per-device choice: neither path holds a collective)."""
  L, b = pre_lbf.shape[:2]
  a_lbf = per_layer(jumprelu)(pre_lbf, p.threshold, bandwidth)
  d = p.b_dec.shape[-1]
  out = [jnp.zeros((b, d), a_lbf.dtype) for _ in range(L)]
  n_sparse = jnp.int32(0)
  for source, w_ftd in enumerate(p.W_dec):
    targets = w_ftd.shape[1]
    w_fn = w_ftd.reshape(w_ftd.shape[0], targets * d)
    a_bf = a_lbf[source]
    if capacity:
      u_bf = (pre_lbf[source] - p.threshold[source]) / bandwidth  # jumprelu's kernel argument
      slots_bf = (pre_lbf[source] > p.threshold[source]) | ((u_bf > -0.5) & (u_bf < 0.5))
      idx_bk, valid_bk, most = active_slots(lax.stop_gradient(slots_bf), capacity)

      def sparse(a_bf, w_fn, idx_bk=idx_bk, valid_bk=valid_bk):
        val_bk = jnp.where(valid_bk, jnp.take_along_axis(a_bf, idx_bk, axis=1), 0.0)
        return sparse_write(w_fn, idx_bk, val_bk)

      fits = most <= capacity
      written = lax.cond(fits, sparse, lambda a_bf, w_fn: a_bf @ w_fn, a_bf, w_fn)
      n_sparse = n_sparse + fits
    else:
      written = a_bf @ w_fn
    written_btd = written.reshape(b, targets, d)
    for j in range(targets):
      out[source + j] = out[source + j] + written_btd[:, j]
  return jnp.stack(out), n_sparse


def _penalty(pre_lbf: jax.Array, p: CLT, dead_lf, lam, c_dead, rows: int, bandwidth: float) -> jax.Array:
  """The sparsity and dead-latent terms of this device's rows and latents (their share of the mean over `rows`)."""
  theta = p.threshold[:, None, :]
  fires_lbf = per_layer(heaviside)(pre_lbf, p.threshold, bandwidth)
  sparsity = lam * jnp.sum(decoder_norms(p)[:, None, :] * fires_lbf)
  pull = c_dead * jnp.sum(jnp.where(dead_lf[:, None, :], jax.nn.relu(theta - pre_lbf), 0.0))
  return (sparsity + pull) / rows


def _member_step(p: CLT, m: dict, since_lf, lam, x_lbd, y_lbd, scalars, *, sweep: CLTSweep):
  """One CLT's update on this device's rows and latents (under `shard_map`)."""
  recipe, adam, rows = sweep.recipe, sweep.recipe.adam, sweep.batch_size
  bandwidth = recipe.bandwidth
  # The encoder runs once: its pullback takes the pre-activations' gradient from both terms.
  pre_lbf, encoder_pullback = jax.vjp(lambda q: _pre_lbf(q, x_lbd), p)
  partial = functools.partial(_partial_yhat, bandwidth=bandwidth, capacity=sweep.capacity)
  part_lbd, decoder_pullback, n_sparse = jax.vjp(partial, pre_lbf, p, has_aux=True)
  r_lbd = lax.psum(part_lbd, MODEL) + p.b_dec[:, None, :] - y_lbd
  g_r = 2.0 * r_lbd / rows
  g_pre_dec, g_dec = decoder_pullback(g_r)
  dead_lf = since_lf >= recipe.dead_window_steps
  lam_now = lam * scalars["sparsity"]
  penalty, (g_pre_pen, g_pen) = jax.value_and_grad(_penalty, argnums=(0, 1))(
    pre_lbf, p, dead_lf, lam_now, recipe.dead_latent_loss, rows, bandwidth
  )
  (g_enc,) = encoder_pullback(g_pre_dec + g_pre_pen)
  g = jax.tree.map(lambda a, b, c: lax.psum(a + b + c, DATA), g_dec, g_pen, g_enc)
  g = g.replace(b_dec=lax.psum(jnp.sum(g_r, axis=1), DATA))

  mse_l = lax.psum(jnp.sum(jnp.square(r_lbd), axis=(1, 2)), DATA) / rows
  y_mean_ld = lax.psum(jnp.sum(y_lbd, axis=1), DATA) / rows
  var_l = lax.psum(jnp.sum(jnp.square(y_lbd - y_mean_ld[:, None, :]), axis=(1, 2)), DATA) / rows
  fires_lbf = pre_lbf > p.threshold[:, None, :]
  l0_l = lax.psum(jnp.sum(fires_lbf, axis=(1, 2), dtype=jnp.float32), (DATA, MODEL)) / rows
  fired_lf = lax.psum(jnp.any(fires_lbf, axis=1).astype(jnp.int32), DATA) > 0
  loss = jnp.sum(mse_l) + lax.psum(penalty, (DATA, MODEL))

  if adam.clip_norm:
    latent_sq = sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(g.replace(b_dec=jnp.zeros(()))))
    norm = jnp.sqrt(lax.psum(latent_sq, MODEL) + jnp.sum(jnp.square(g.b_dec)))
    g = jax.tree.map(lambda a: a * jnp.minimum(1.0, adam.clip_norm / (norm + 1e-12)), g)
  new_p, moments = _adam(adam, p, g, m, scalars)
  new_p = new_p.replace(threshold=jnp.maximum(new_p.threshold, 0.0))
  since_lf = jnp.where(fired_lf, 0, since_lf + 1)
  sparse = lax.pmean(n_sparse / sweep.layers, (DATA, MODEL))
  stats = {"loss": loss, "mse_l": mse_l, "fvu_l": mse_l / var_l, "l0_l": l0_l, "sparse": sparse}
  return new_p, moments, since_lf, stats


def _adam(adam: Adam, p: CLT, g: CLT, m: dict, scalars: dict) -> tuple[CLT, dict]:
  """Adam's update of every leaf (elementwise: each device updates its own latents)."""
  leaves_p, treedef = jax.tree.flatten(p)
  leaves_g = treedef.flatten_up_to(g)
  leaves_m = {k: treedef.flatten_up_to(v) for k, v in m.items()}
  new_p, new_m = [], {k: [] for k in m}
  for i, (pi, gi) in enumerate(zip(leaves_p, leaves_g)):
    mi = adam.moments(gi, {k: v[i] for k, v in leaves_m.items()})
    new_p.append(adam.apply(pi, gi, mi, scalars["t"], scalars["lr"]))
    for k in m:
      new_m[k].append(mi[k])
  return treedef.unflatten(new_p), {k: treedef.unflatten(v) for k, v in new_m.items()}


def make_step(sweep: CLTSweep, mesh: Mesh):
  """`step(state, x_bld, y_bld) -> (state, stats)`, jitted; rows `[batch, L, d]` sharded on `data`."""
  recipe = sweep.recipe
  lr = lr_schedule(recipe.lr, recipe.lr_warmup_steps, recipe.lr_decay_steps, sweep.steps)
  warm = sparsity_warmup(recipe.sparsity_warmup_steps)
  lams = jnp.asarray([lam for lam, _ in sweep.members], jnp.float32)
  specs = _tree_specs(sweep.layers, param_specs())
  moment_specs = {k: specs for k in recipe.adam.moment_names}
  latent = P(None, None, MODEL)

  def body(params, moments, since, lams, x_bld, y_bld, scalars):
    """Each CLT of the stack in turn (a loop, not vmap: the sparse path's `lax.cond` must stay a branch)."""
    x_lbd, y_lbd = jnp.swapaxes(x_bld, 0, 1), jnp.swapaxes(y_bld, 0, 1)
    outs = []
    for i in range(len(sweep.members)):
      take = lambda tree, i=i: jax.tree.map(lambda a: a[i], tree)
      outs.append(_member_step(take(params), take(moments), since[i], lams[i], x_lbd, y_lbd, scalars, sweep=sweep))
    return jax.tree.map(lambda *a: jnp.stack(a), *outs)

  stat_specs = {name: P() for name in STAT_NAMES}
  sharded = jax.shard_map(
    body,
    mesh=mesh,
    check_vma=False,
    in_specs=(specs, moment_specs, latent, P(), P(DATA), P(DATA), P()),
    out_specs=(specs, moment_specs, latent, stat_specs),
  )

  def step(state: dict, x_bld: jax.Array, y_bld: jax.Array) -> tuple[dict, dict]:
    t = state["step"] + 1
    scalars = {"t": t.astype(jnp.float32), "lr": lr(state["step"]), "sparsity": warm(state["step"])}
    params, moments, since, stats = sharded(
      state["params"], state["opt_state"], state["since_fired"], lams, x_bld, y_bld, scalars
    )
    (first_bad,) = state["first_bad_step"]  # [S]
    bad = ~jnp.isfinite(stats["loss"]) & (first_bad < 0)
    first_bad = (jnp.where(bad, state["step"], first_bad),)
    new = {"step": t, "params": params, "opt_state": moments, "since_fired": since, "first_bad_step": first_bad}
    return new, stats

  return jax.jit(step, donate_argnums=0)
