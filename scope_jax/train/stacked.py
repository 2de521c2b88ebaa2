"""A sweep of JumpReLU SAEs (or transcoders) trained together: one jitted, sharded step updates all of them.

SAEs of one width are stacked on a leading axis (a *group*); TopK and BatchTopK SAEs (train/topk.py)
stack the same way, k taking λ's place; the step loops over groups and
over each stack with the blocked single-SAE step (`step.py`), so every SAE sees the same
batch and gets exactly the update it would get alone. Shardings: batch on `data`, latents on
`model`; the stack axis is replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from scope_jax.core.choices import ACTIVATIONS
from scope_jax.core.kinds import SAE, Kind, kind_named, topk_problem
from scope_jax.data.batch import Batch
from scope_jax.data.normalization import check_normalization
from scope_jax.parallel.mesh import DATA, MODEL, logical_spec
from scope_jax.parallel.precision import at_precision
from scope_jax.sae.loss import LossSpec, check_prefixes
from scope_jax.sae.model import init_sae, init_transcoder
from scope_jax.train import sparse, step, topk
from scope_jax.train.optim import Adam, lr_schedule, sparsity_warmup
from scope_jax.train.params import LATENT_LEAVES, TrainParams
from scope_jax.train.step import STAT_NAMES, Scalars, StepSpec
from scope_jax.train.tiling import Tiling, choose_tiling, device_free_bytes, keeps_gradients

RANKED = ACTIVATIONS[1:]  # topk, batchtopk: latents chosen by rank, swept over k


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Hyper-parameters shared by every SAE of a sweep (defaults: Gemma Scope, docs/recipe.md §2)."""

  lr: float = 7e-5
  lr_warmup_steps: int = 1_000
  lr_decay_steps: int = 0  # linear decay to 0 over the run's last steps (train.steps); 0 = none
  sparsity_warmup_steps: int = 10_000
  adam_b1: float = 0.0
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  clip_grad_norm: float = 0.0  # per SAE and step, the gradient's global norm is clipped to this; 0 = off
  lazy_adam: bool = True  # Adam skips latents with a zero gradient, exactly (β1 = 0 only; train/step.py)
  bandwidth: float = 0.001
  init_threshold: float = 0.001
  sparsity_loss: str = "l0"  # "quadratic": Gemma Scope 2's λ·(2/L0*)·(L0 - L0*)²
  target_l0: float | None = None  # L0* of the quadratic loss
  dead_window_steps: int = 1_000  # a latent is dead when it has not fired for this many steps
  dead_latent_loss: float = 0.0  # c of the pre-activation loss on dead latents (sae/loss.py); 0 = off
  frequency_scale: float = 0.0  # s of the penalty on high-frequency latents (sae/loss.py); 0 = off
  normalize: str = "centred"  # how C is chosen: "centred" E||(x-μ)/C||² = 1, "raw" E||x/C||² = 1
  # (Gemma Scope); data/normalization.py says why centred is the default
  auxk_coefficient: float = 1 / 32  # TopK, BatchTopK: α of AuxK (dead latents decode the residual; train/topk.py)
  auxk_k: int = 0  # AuxK's dead latents per token; 0 = half the reconstructed width (Gao et al.)
  threshold_ema: float = 0.01  # BatchTopK: the EMA rate of its released θ (SAELens' topk_threshold_lr)

  @property
  def loss(self) -> LossSpec:
    return LossSpec(self.bandwidth, self.sparsity_loss, self.target_l0, self.dead_latent_loss, self.frequency_scale)

  def group_loss(self, group: Group, kind: Kind | str) -> LossSpec:
    """The loss of `group`'s SAEs of kind `kind` (its activation, Matryoshka prefixes, transcoder or not)."""
    ranked = group.activation != "jumprelu"
    return dataclasses.replace(
      self.loss,
      transcoder=kind_named(kind).transcoder,
      prefixes=group.prefixes,
      activation=group.activation,
      auxk_coefficient=self.auxk_coefficient if ranked else 0.0,
      auxk_k=self.auxk_k if ranked else 0,
    )

  @property
  def adam(self) -> Adam:
    return Adam(self.adam_b1, self.adam_b2, self.adam_eps, self.clip_grad_norm, self.lazy_adam)

  def __post_init__(self):
    _ = self.loss  # constructing the LossSpec validates the loss fields
    check_normalization(self.normalize)
    if not 0 < self.threshold_ema <= 1:
      raise ValueError(f"recipe.threshold_ema {self.threshold_ema}: expected a rate in (0, 1]")


@dataclasses.dataclass(frozen=True)
class Group:
  """The SAEs of one width: every (sparsity, seed) pair, in that order, the sparsity being λ for
  JumpReLU SAEs and k for TopK and BatchTopK ones; Matryoshka prefix sizes (the width last) or ()."""

  width: int
  members: tuple[tuple[float, int], ...]  # (λ or k, seed)
  prefixes: tuple[int, ...] = ()
  activation: str = "jumprelu"  # jumprelu | topk | batchtopk (core/choices.py)

  @property
  def names(self) -> list[str]:
    return [sae_name(self.width, value, seed, self.activation) for value, seed in self.members]

  @property
  def ranked(self) -> bool:
    """Latents chosen by rank (TopK, BatchTopK): members are (k, seed)."""
    return self.activation != "jumprelu"


@dataclasses.dataclass(frozen=True)
class Sweep:
  """What a sweep's state and step are built from (`train/run.py` reads it from a config)."""

  groups: tuple[Group, ...]
  recipe: Recipe
  batch_size: int  # rows of a global batch
  kind: Kind = SAE
  seed: int = 0  # the base seed every SAE's initialization derives from
  latent_block: int = 0  # latents per block of the blocked step; 0: train/tiling.py chooses
  steps: int = 0  # the run's length, where the learning rate's decay ends (`recipe.lr_decay_steps`)
  precision: str = "float32"  # the matmuls' (parallel/precision.py)

  def __post_init__(self):
    for group in self.groups:
      if group.activation == "topk" and (problem := topk_problem(self.kind.name, group.prefixes)):
        raise ValueError(problem)


def sae_name(width: int, value: float, seed: int, activation: str = "jumprelu") -> str:
  """`w{width}-l{λ}-s{seed}`, or for TopK and BatchTopK `w{width}-k{k}-s{seed}`."""
  return f"w{width}-k{int(value)}-s{seed}" if activation in RANKED else f"w{width}-l{value:g}-s{seed}"


def make_groups(
  widths: Sequence[int],
  values: Sequence[float],
  seeds: Sequence[int] = (0,),
  prefixes: Sequence[int] = (),
  activation: str = "jumprelu",
) -> tuple[Group, ...]:
  """One group per width holding every value × seed (λ for JumpReLU, k for TopK and BatchTopK),
  with clear errors for empty or bad lists; `prefixes`: Matryoshka prefix sizes shared by every
  width (each below the narrowest)."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"sweep.activation {activation!r}: expected one of {ACTIVATIONS}")
  field = "k" if activation in RANKED else "l1_coefficients"
  for name, entries in (("widths", widths), (field, values), ("seeds", seeds)):
    if len(entries) == 0:
      raise ValueError(f"sweep.{name} is empty; list at least one value")
  if any(int(w) != w or w < 1 for w in widths) or len(set(widths)) != len(widths):
    raise ValueError(f"sweep.widths {list(widths)} must be distinct positive integers")
  if activation in RANKED:
    if any(int(k) != k or k < 1 for k in values):
      raise ValueError(f"sweep.k {list(values)}: expected positive integers (latents per token)")
    if max(values) >= min(widths):
      raise ValueError(f"sweep.k {max(values)} must be below every width (the narrowest is {min(widths)})")
  elif any(lam < 0 for lam in values):
    raise ValueError(f"sweep.l1_coefficients {list(values)} must be >= 0")
  numbers = [int(v) for v in values] if activation in RANKED else [float(v) for v in values]
  members = tuple(itertools.product(numbers, [int(s) for s in seeds]))
  for w in widths:
    check_prefixes(prefixes, w, f"sweep.prefixes (width {w})")
  return tuple(Group(int(w), members, check_prefixes(prefixes, w) if len(prefixes) else (), activation) for w in widths)


# ------------------------------------------------------------------ state and shardings


def init_group(
  base_seed: int, b_dec_d: jax.Array, group: Group, recipe: Recipe, kind: Kind = SAE, d_in: int | None = None
) -> TrainParams:
  """The stacked initial SAEs (or transcoders, input width `d_in`) of `group` in the trainer's
  layout, `b_dec` at `b_dec_d` (the mean of what they reconstruct); the rest of each depends only
  on (base seed, width, seed)."""
  base = jax.random.key(base_seed)
  d_out = b_dec_d.shape[-1]
  keys = [jax.random.fold_in(jax.random.fold_in(base, group.width), seed) for _, seed in group.members]
  threshold = 0.0 if group.ranked else recipe.init_threshold  # BatchTopK's θ starts where SAELens' does
  if kind.transcoder:
    saes = [init_transcoder(k, d_in, d_out, group.width, threshold, b_dec_d, kind.skip) for k in keys]
  else:
    saes = [init_sae(key, d_out, group.width, threshold, b_dec_d) for key in keys]
  return TrainParams.from_sae(jax.tree.map(lambda *a: jnp.stack(a), *saes))


def group_spec(mesh: Mesh, width: int, skip: bool = False) -> TrainParams:
  """PartitionSpecs of a stacked group: latents on `model`, the stack (and a skip) replicated."""
  what = f"SAE width {width}"
  latents = logical_spec(mesh, (None, "latents"), (1, width), what)[1]
  return TrainParams(
    W_enc=P(None, latents, None),
    b_enc=P(None, latents),
    W_dec=P(None, latents, None),
    b_dec=P(None, None),
    threshold=P(None, latents),
    W_skip=P(None, None, None) if skip else None,
  )


def state_shardings(mesh: Mesh, groups: Sequence[Group], adam: Adam, kind: Kind = SAE) -> dict:
  to_sharding = lambda spec: NamedSharding(mesh, spec)
  params = tuple(jax.tree.map(to_sharding, group_spec(mesh, g.width, kind.skip)) for g in groups)
  replicated = NamedSharding(mesh, P())
  return {
    "step": replicated,
    "params": params,
    "opt_state": {k: params for k in adam.moment_names} | {"latent_step": tuple(p.b_enc for p in params)},
    "since_fired": tuple(p.b_enc for p in params),
    "first_bad_step": tuple(replicated for _ in groups),
  }


def init_state(
  base_seed: int, b_dec_d: jax.Array, groups: Sequence[Group], recipe: Recipe, kind: Kind = SAE, d_in: int | None = None
) -> dict:
  params = tuple(init_group(base_seed, b_dec_d, g, recipe, kind, d_in) for g in groups)
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "opt_state": recipe.adam.init(params),
    "since_fired": tuple(jnp.zeros(p.b_enc.shape, jnp.int32) for p in params),
    "first_bad_step": tuple(jnp.full(p.b_enc.shape[:1], -1, jnp.int32) for p in params),
  }


# ------------------------------------------------------------------ the step


def width_local(mesh: Mesh, width: int) -> int:
  """The latents of a `width`-wide SAE each device holds."""
  return width // mesh.shape[MODEL] if group_spec(mesh, width).b_enc[1] else width


def group_tiling(
  mesh: Mesh, group: Group, batch: int, requested_block: int, sparse_step: bool, free_bytes: int | None
) -> Tiling:
  """How `group`'s step walks its local latents (train/tiling.py); `free_bytes` None: the cache rule."""
  return choose_tiling(
    width_local(mesh, group.width), batch // mesh.shape[DATA], sparse_step, requested_block, group.prefixes, free_bytes
  )


def _group_step(mesh: Mesh, sweep: Sweep, group: Group, tiling: Tiling, capacity: int):
  """`(params, moments, rows, scalars, dead_sm) -> (params, moments, stats)` for one stacked group:
  `step.train_group` under `shard_map` (rows on `data`, latents on `model`), by the dense step, or
  by the sparse one with `capacity` slots per token (train/sparse.py)."""
  recipe = sweep.recipe
  spec = group_spec(mesh, group.width, sweep.kind.skip)
  bound = StepSpec(
    recipe.group_loss(group, sweep.kind),
    recipe.adam,
    tiling.block,
    sweep.batch_size,
    tiling.gradient_bytes,
    recipe.threshold_ema,
  )
  capacity = check_capacity(capacity, group.width) if capacity else 0
  if group.ranked:
    one = functools.partial(topk.train_sae, spec=bound, capacity=capacity)
  elif capacity:
    one = functools.partial(sparse.train_sae, spec=bound, capacity=capacity)
  else:
    one = functools.partial(step.train_sae, spec=bound, keep_pre=tiling.keep_pre)
  moment_specs = {k: spec for k in recipe.adam.moment_names} | {"latent_step": spec.b_enc}
  stat_specs = {k: P() for k in STAT_NAMES} | {"fired_m": spec.b_enc}
  return jax.shard_map(
    functools.partial(step.train_group, train_one=one),
    mesh=mesh,
    check_vma=False,
    in_specs=(spec, moment_specs, P(DATA, None), P(), spec.b_enc),  # the rows' and scalars' specs as prefixes
    out_specs=(spec, moment_specs, stat_specs),
  )


def check_capacity(capacity: int, width: int) -> int:
  if not 1 <= capacity <= width:
    raise ValueError(f"train.capacity {capacity}: slots per token must be between 1 and the SAE width {width}")
  return capacity


def current_moments(state: dict, adam: Adam) -> dict:
  """The Adam moments the dense update would hold at `state["step"]`: the lazy update (train/step.py)
  leaves each latent with the moments of the step in `latent_step`."""
  opt, out = state["opt_state"], {k: [] for k in adam.moment_names}
  for gi, latent_step_sm in enumerate(opt["latent_step"]):
    skipped_sm = state["step"] - latent_step_sm
    caught = {
      name: adam.catch_up({k: getattr(opt[k][gi], name) for k in adam.moment_names}, skipped_sm)
      for name in LATENT_LEAVES
    }
    for k in adam.moment_names:
      out[k].append(opt[k][gi].replace(**{name: caught[name][k] for name in LATENT_LEAVES}))
  return {k: tuple(v) for k, v in out.items()}


def threshold_quantiles(threshold_sm: jax.Array) -> dict[str, jax.Array]:
  """The 10th, 50th and 90th percentile of each SAE's thresholds `[S]`."""
  q = jnp.quantile(threshold_sm, jnp.asarray([0.1, 0.5, 0.9]), axis=-1)
  return {"threshold_p10": q[0], "threshold_p50": q[1], "threshold_p90": q[2]}


def make_train_step(
  sweep: Sweep,
  shardings: dict,
  mesh: Mesh,
  mean_d: jax.Array,
  capacities: Sequence[int] = (),
  free_bytes: int | None = None,
  quiet: bool = False,
):
  """The jitted `step_fn(state, batch: Batch) -> (state, metrics)`; metrics: per group, per SAE.

  `mean_d`: the mean of what the SAEs reconstruct (a transcoder's target), in training units (how
  far `b_dec` moved from it is a health metric); `capacities`: per group, 0 for the dense step or
  the sparse step's slots per token (none given: all dense); `free_bytes`: the device memory the
  tiling is sized for (train/tiling.py; None: what the mesh's devices report, or the cache rule on
  CPU). The tiling is printed (process 0, unless `quiet`) and in every step's metrics
  (`latent_block`, `keeps_pre`, `keeps_gradients`)."""
  groups, recipe = sweep.groups, sweep.recipe
  lambdas = tuple(jnp.asarray([0.0 if g.ranked else lam for lam, _ in g.members], jnp.float32) for g in groups)
  ks = tuple(jnp.asarray([int(v) if g.ranked else 0 for v, _ in g.members], jnp.int32) for g in groups)
  lam_factor = sparsity_warmup(recipe.sparsity_warmup_steps)
  lr_at = lr_schedule(recipe.lr, recipe.lr_warmup_steps, recipe.lr_decay_steps, sweep.steps)
  capacities = tuple(capacities) or (0,) * len(groups)
  free_bytes = device_free_bytes(mesh) if free_bytes is None else free_bytes
  block = sweep.latent_block
  tilings = [group_tiling(mesh, g, sweep.batch_size, block, k > 0, free_bytes) for g, k in zip(groups, capacities)]
  if jax.process_index() == 0 and not quiet:
    for g, k, tiling in zip(groups, capacities, tilings):
      name = "sparse" if k else "dense"
      tqdm.write(f"train: width {g.width}, {name} step: {tiling.describe(width_local(mesh, g.width))} per device")
  group_steps = [_group_step(mesh, sweep, g, t, k) for g, t, k in zip(groups, tilings, capacities)]
  kept_gradients = lambda p, tiling: keeps_gradients(
    tiling.gradient_bytes, recipe.clip_grad_norm, width_local(mesh, p.width), p.W_enc.shape[-1], p.W_dec.shape[-1]
  )

  def train_step(state, rows: Batch):
    step = state["step"]
    factor, lr, t = lam_factor(step), lr_at(step), (step + 1).astype(jnp.float32)
    y_bd = rows.targets_bd  # what is reconstructed: the input, or the target
    variance = jnp.mean(jnp.sum(jnp.square(y_bd - jnp.mean(y_bd, axis=0)), axis=-1))  # FVU's denominator, once
    params, since_fired, first_bad, metrics = [], [], [], []
    moments = {k: [] for k in state["opt_state"]}
    for gi, (group_step, lam_s, k_s) in enumerate(zip(group_steps, lambdas, ks)):
      group_moments = {k: v[gi] for k, v in state["opt_state"].items()}
      dead_sm = state["since_fired"][gi] >= recipe.dead_window_steps
      p, m, s = group_step(state["params"][gi], group_moments, rows, Scalars(factor * lam_s, lr, t, k_s), dead_sm)
      since = jnp.where(s.pop("fired_m"), 0, state["since_fired"][gi] + 1)
      bad = state["first_bad_step"][gi]
      bad = jnp.where((bad < 0) & ~jnp.isfinite(s["loss"]), step, bad)
      s |= {
        "fvu": s["mse"] / variance,
        "dead_fraction": jnp.mean(since >= recipe.dead_window_steps, axis=-1),
        "threshold_mean": jnp.mean(p.threshold, axis=-1),
        "threshold_min": jnp.min(p.threshold, axis=-1),
        "threshold_max": jnp.max(p.threshold, axis=-1),
        "l1_coefficient": factor * lam_s,
        **threshold_quantiles(p.threshold),
        "k": k_s.astype(jnp.float32),
        "threshold_moved": (
          jnp.zeros(lam_s.shape)
          if groups[gi].ranked  # TopK has no θ; BatchTopK's follows its batches
          else jnp.mean(jnp.abs(p.threshold - recipe.init_threshold), axis=-1) / recipe.init_threshold
        ),
        "b_dec_drift": jnp.linalg.norm(p.b_dec - mean_d, axis=-1),
        "latent_block": jnp.full(lam_s.shape, tilings[gi].block, jnp.float32),
        "keeps_pre": jnp.full(lam_s.shape, tilings[gi].keep_pre, jnp.float32),
        "keeps_gradients": jnp.full(lam_s.shape, kept_gradients(p, tilings[gi]), jnp.float32),
      }
      params.append(p)
      for k in moments:
        moments[k].append(m[k])
      since_fired.append(since)
      first_bad.append(bad)
      metrics.append(s)
    new_state = {
      "step": step + 1,
      "params": tuple(params),
      "opt_state": {k: tuple(v) for k, v in moments.items()},
      "since_fired": tuple(since_fired),
      "first_bad_step": tuple(first_bad),
    }
    return new_state, metrics

  batch_sharding = NamedSharding(mesh, P(DATA, None))
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    at_precision(sweep.precision, train_step),
    in_shardings=(shardings, batch_sharding),  # a prefix of the Batch: each of its arrays
    out_shardings=(shardings, replicated),
    donate_argnums=(0,),
  )


def initializer(sweep: Sweep, mesh: Mesh, mean_d, d_in: int | None = None):
  """(jitted `init() -> state` placing the initial state on the mesh, its shardings). `mean_d`
  `[d_out]`: the mean of what the SAEs reconstruct, in training units, where every `b_dec` starts
  (docs/recipe.md §2 starts it at zero; at a site with a large constant offset that spends the
  first thousands of steps, and many latents, on the offset); `d_in`: a transcoder's input width."""
  if (batch := sweep.batch_size) % mesh.shape[DATA]:
    raise ValueError(f"train.batch_size {batch} is not divisible by the mesh's data axis ({mesh.shape[DATA]})")
  shardings = state_shardings(mesh, sweep.groups, sweep.recipe.adam, sweep.kind)
  mean_d = jnp.asarray(mean_d, jnp.float32)
  init = functools.partial(init_state, sweep.seed, mean_d, sweep.groups, sweep.recipe, sweep.kind, d_in)
  return jax.jit(init, out_shardings=shardings), shardings


def abstract_state(init, shardings: dict) -> dict:
  """The shapes, dtypes and shardings of the state `init` makes (what a checkpoint restores into,
  what a step is lowered for), by tracing it: nothing is computed or allocated."""
  shapes = jax.eval_shape(init)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def recipe_from(config: ml_collections.ConfigDict) -> Recipe:
  return Recipe(**config.recipe.to_dict())


def groups_from(config: ml_collections.ConfigDict):
  s = config.sweep
  values = list(s.k) if s.activation in RANKED else list(s.l1_coefficients)
  return make_groups(list(s.widths), values, list(s.seeds), list(s.prefixes), s.activation)


def sweep_from(config: ml_collections.ConfigDict) -> Sweep:
  """The config's sweep: `sweep.*`, `recipe.*`, `kind`, `seed`, `precision` and the `train` fields the step uses."""
  t = config.train
  kind = kind_named(config.kind)
  return Sweep(
    groups_from(config), recipe_from(config), t.batch_size, kind, config.seed, t.latent_block, t.steps, config.precision
  )
