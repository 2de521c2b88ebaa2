"""A sweep of JumpReLU SAEs trained together: one jitted, sharded step updates all of them.

SAEs of one width are stacked on a leading axis (a *group*); the step loops over groups and
`vmap`s over each stack, so every SAE sees the same batch and gets exactly the gradient of its
own loss (the total loss is a sum of independent terms). Shardings: batch on `data`, latents
on `model`; the stack axis is replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scope_jax.parallel.mesh import DATA, logical_spec
from scope_jax.sae.loss import LossSpec, sae_loss
from scope_jax.sae.model import SAE, init_sae
from scope_jax.train.optim import constrain, make_optimizer, sparsity_warmup


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Hyper-parameters shared by every SAE of a sweep (defaults: Gemma Scope, RECIPE §2)."""
  lr: float = 7e-5
  lr_warmup_steps: int = 1_000
  sparsity_warmup_steps: int = 10_000
  adam_b1: float = 0.0
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  bandwidth: float = 0.001
  init_threshold: float = 0.001
  sparsity_loss: str = "l0"          # "quadratic": Gemma Scope 2's λ·(2/L0*)·(L0 - L0*)²
  target_l0: float | None = None     # L0* of the quadratic loss
  dead_window_steps: int = 1_000     # a latent is dead when it has not fired for this many steps

  @property
  def loss(self) -> LossSpec:
    return LossSpec(self.bandwidth, self.sparsity_loss, self.target_l0)

  def __post_init__(self):
    self.loss  # validates the loss fields


@dataclasses.dataclass(frozen=True)
class Group:
  """The SAEs of one width: every (λ, seed) pair, in that order."""
  width: int
  members: tuple[tuple[float, int], ...]  # (λ, seed)

  @property
  def names(self) -> list[str]:
    return [sae_name(self.width, lam, seed) for lam, seed in self.members]


def sae_name(width: int, lam: float, seed: int) -> str:
  return f"w{width}-l{lam:g}-s{seed}"


def make_groups(widths: Sequence[int], lambdas: Sequence[float], seeds: Sequence[int] = (0,)) -> tuple[Group, ...]:
  """One group per width holding every λ × seed, with clear errors for empty or bad lists."""
  for name, values in (("widths", widths), ("l1_coefficients", lambdas), ("seeds", seeds)):
    if len(values) == 0:
      raise ValueError(f"sweep: {name} is empty; list at least one value")
  if any(int(w) != w or w < 1 for w in widths) or len(set(widths)) != len(widths):
    raise ValueError(f"sweep: widths {list(widths)} must be distinct positive integers")
  if any(lam < 0 for lam in lambdas):
    raise ValueError(f"sweep: l1_coefficients {list(lambdas)} must be >= 0")
  members = tuple(itertools.product([float(lam) for lam in lambdas], [int(s) for s in seeds]))
  return tuple(Group(int(w), members) for w in widths)


# ------------------------------------------------------------------ state and shardings


def init_group(base_seed: int, d_in: int, group: Group, recipe: Recipe) -> SAE:
  """The stacked initial SAEs of `group`; each depends only on (base seed, width, seed)."""
  base = jax.random.key(base_seed)
  saes = [init_sae(jax.random.fold_in(jax.random.fold_in(base, group.width), seed), d_in, group.width,
                   recipe.init_threshold) for _, seed in group.members]
  return jax.tree.map(lambda *a: jnp.stack(a), *saes)


def group_spec(mesh: Mesh, width: int) -> SAE:
  """PartitionSpecs of a stacked group: latents on `model`, the stack replicated."""
  what = f"SAE width {width}"
  latents = logical_spec(mesh, (None, "latents"), (1, width), what)[1]
  return SAE(W_enc=P(None, None, latents), b_enc=P(None, latents), W_dec=P(None, latents, None),
             b_dec=P(None, None), threshold=P(None, latents))


def state_shardings(mesh: Mesh, groups: Sequence[Group], optimizer, abstract_state) -> dict:
  param_specs = tuple(group_spec(mesh, g.width) for g in groups)
  to_sharding = lambda spec: NamedSharding(mesh, spec)
  params = jax.tree.map(to_sharding, param_specs, is_leaf=lambda x: isinstance(x, P))
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state["opt_state"], params,
                              transform_non_params=lambda _: replicated)
  return {
      "step": replicated,
      "params": params,
      "opt_state": opt,
      "since_fired": tuple(to_sharding(s.b_enc) for s in param_specs),
      "first_bad_step": tuple(replicated for _ in groups),
  }


def init_state(base_seed: int, d_in: int, groups: Sequence[Group], recipe: Recipe, optimizer) -> dict:
  params = tuple(init_group(base_seed, d_in, g, recipe) for g in groups)
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": optimizer.init(params),
      "since_fired": tuple(jnp.zeros(p.b_enc.shape, jnp.int32) for p in params),
      "first_bad_step": tuple(jnp.full(p.b_enc.shape[:1], -1, jnp.int32) for p in params),
  }


# ------------------------------------------------------------------ loss and step


def _tree_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def make_train_step(groups: Sequence[Group], recipe: Recipe, optimizer, shardings: dict, mesh: Mesh,
                    microbatches: int = 1):
  """The jitted `step_fn(state, x_bd) -> (state, metrics)`; metrics: per group, per SAE.

  `microbatches > 1` accumulates the gradient over that many slices of the batch (a `scan`), so
  the `[rows, latents]` temporaries shrink by that factor; the update is the same up to rounding.
  """
  lambdas = tuple(jnp.asarray([lam for lam, _ in g.members], jnp.float32) for g in groups)
  lam_factor = sparsity_warmup(recipe.sparsity_warmup_steps)

  def total_loss(params, x_bd, factor):
    losses, stats = [], []
    for sae, lam_s in zip(params, lambdas):
      loss_s, stats_s = jax.vmap(sae_loss, in_axes=(0, None, 0, None))(sae, x_bd, factor * lam_s, recipe.loss)
      losses.append(loss_s)
      stats.append(stats_s | {"loss": loss_s})
    return sum(jnp.sum(l) for l in losses), stats

  loss_grad = jax.grad(total_loss, has_aux=True)

  def accumulated_grad(params, x_bd, factor):
    """Mean gradient and statistics over `microbatches` slices; slice i holds rows i, k+i, 2k+i, ...
    so every device keeps its own rows."""
    rows, width = x_bd.shape
    chunks = jnp.moveaxis(x_bd.reshape(rows // microbatches, microbatches, width), 1, 0)
    chunks = jax.lax.with_sharding_constraint(chunks, NamedSharding(mesh, P(None, DATA, None)))

    def body(acc, x_chunk):
      grads, stats = loss_grad(params, x_chunk, factor)
      return jax.tree.map(jnp.add, acc, grads), stats

    grads, stats = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), chunks)
    stats = [{k: (jnp.any(v, axis=0) if k == "fired_m" else jnp.mean(v, axis=0)) for k, v in s.items()} for s in stats]
    return jax.tree.map(lambda g: g / microbatches, grads), stats

  def train_step(state, x_bd):
    factor = lam_factor(state["step"])
    grad_fn = loss_grad if microbatches == 1 else accumulated_grad
    grads, stats = grad_fn(state["params"], x_bd, factor)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = tuple(constrain(p) for p in optax.apply_updates(state["params"], updates))
    metrics, since_fired, first_bad = [], [], []
    for g, p, s, since, bad, lam_s in zip(grads, params, stats, state["since_fired"], state["first_bad_step"], lambdas):
      since = jnp.where(s.pop("fired_m"), 0, since + 1)
      finite = jnp.isfinite(s["loss"])
      bad = jnp.where((bad < 0) & ~finite, state["step"], bad)
      s |= {"grad_norm": jax.vmap(_tree_norm)(g), "dead_fraction": jnp.mean(since >= recipe.dead_window_steps, axis=-1),
            "threshold_mean": jnp.mean(p.threshold, axis=-1), "threshold_min": jnp.min(p.threshold, axis=-1),
            "threshold_max": jnp.max(p.threshold, axis=-1), "l1_coefficient": factor * lam_s}
      metrics.append(s)
      since_fired.append(since)
      first_bad.append(bad)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "since_fired": tuple(since_fired), "first_bad_step": tuple(first_bad)}
    return new_state, metrics

  batch_sharding = NamedSharding(mesh, P(DATA, None))
  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


def build(base_seed: int, d_in: int, groups: Sequence[Group], recipe: Recipe, mesh: Mesh, microbatches: int = 1):
  """(jitted `init() -> state` placing the initial state on the mesh, its shardings, the jitted step)."""
  optimizer = make_optimizer(recipe.lr, recipe.lr_warmup_steps, recipe.adam_b1, recipe.adam_b2, recipe.adam_eps)
  init = functools.partial(init_state, base_seed, d_in, groups, recipe, optimizer)
  shardings = state_shardings(mesh, groups, optimizer, jax.eval_shape(init))
  return jax.jit(init, out_shardings=shardings), shardings, make_train_step(groups, recipe, optimizer, shardings, mesh, microbatches)


def auto_microbatches(batch_size: int, data: int, rows_per_slice: int = 512) -> int:
  """Slices of about `rows_per_slice` rows per device: on CPU this is faster than one big step
  (the [rows, latents] temporaries stay in cache) and needs far less memory."""
  per_device = batch_size // data
  k = max(1, per_device // rows_per_slice)
  while batch_size % (k * data):
    k -= 1
  return k


def recipe_from(config: ml_collections.ConfigDict) -> Recipe:
  return Recipe(**config.recipe.to_dict())


def groups_from(config: ml_collections.ConfigDict):
  s = config.sweep
  return make_groups(list(s.widths), list(s.l1_coefficients), list(s.seeds))
