"""The sparse step against the dense one from a trained-like state: the same parameters and Adam
state, untouched latents bit for bit, the dense step standing in where a token has too many
slots; the choice between the steps (`train.step`) and its bad values."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scope_jax.config import default_config, validate
from scope_jax.parallel.mesh import make_mesh
from scope_jax.sae.model import PARAM_NAMES, SAE, init_sae
from scope_jax.train import stacked
from scope_jax.train.params import LATENT_LEAVES, TrainParams
from scope_jax.train.selection import StepChooser, auto_capacity
from tests.train.steps import build_step

D, M, ROWS, L0 = 32, 256, 128, 16


def trained_like(seed: int, x: np.ndarray, l0: float = L0, bandwidth: float = 0.05) -> SAE:
  """A training-form SAE whose latents fire with heavy-tailed densities summing to `l0` on `x`
  (thresholds at the matching quantiles of each latent's pre-activations), nudged so that some
  pre-activations sit inside the kernel window."""
  rows, d = x.shape
  sae = init_sae(jax.random.key(seed), d, M)
  rng = np.random.default_rng(seed)
  sae = sae.replace(
    b_enc=jnp.asarray(rng.normal(0, 0.05, M), jnp.float32), b_dec=jnp.asarray(rng.normal(0, 0.1, d), jnp.float32)
  )  # a trained b_dec, not the zero of initialization: the step moves it by ~lr, as it moves the rest
  pre = np.asarray((x - sae.b_dec) @ sae.W_enc + sae.b_enc, np.float64)
  zipf = 1 / np.arange(1, M + 1) ** 1.2
  density = np.minimum(l0 * zipf / zipf.sum(), 0.5)
  theta = np.array([np.quantile(pre[:, i], 1 - density[i]) for i in range(M)])
  theta += rng.uniform(-bandwidth / 4, bandwidth / 4, M)  # some pre-activations inside the window
  theta = np.where(density * rows < 1, pre.max(axis=0) + 0.1, theta)  # the tail: silent on `x`
  return sae.replace(threshold=jnp.asarray(np.maximum(theta, 1e-3), jnp.float32))


def _recipe(**changes) -> stacked.Recipe:
  return stacked.Recipe(lr=1e-3, lr_warmup_steps=0, sparsity_warmup_steps=0, bandwidth=0.05, **changes)


def _starting_at(saes: list[SAE], init, shardings) -> dict:
  """A fresh state of one stacked group whose parameters are `saes` (training-form `SAE`s)."""
  stacked_saes = TrainParams.from_sae(jax.tree.map(lambda *a: np.stack(a), *[jax.device_get(s) for s in saes]))
  return init() | {"params": jax.device_put((stacked_saes,), shardings["params"])}


def _one_step(mesh_shape, capacity, saes, x, recipe, dead_m, block=32):
  mesh = make_mesh(*mesh_shape)
  groups = stacked.make_groups([M], [0.01, 0.1][: len(saes)])
  init, shardings, step_fn = build_step(0, np.zeros(D), groups, recipe, mesh, ROWS, block, 0, (capacity,))
  state = _starting_at(saes, init, shardings)
  nu = jax.tree.map(lambda p: np.full(p.shape, 1e-6, np.float32), state["params"][0])  # a trained Adam state
  state["opt_state"]["nu"] = jax.device_put((nu,), shardings["opt_state"]["nu"])
  since = np.where(dead_m, recipe.dead_window_steps, 0)[None].repeat(len(saes), 0).astype(np.int32)
  state["since_fired"] = (jax.device_put(since, state["since_fired"][0].sharding),)
  state, metrics = step_fn(state, x)
  return jax.device_get(state), jax.device_get(metrics[0])


def _data(seed=0):
  return np.random.default_rng(seed).normal(size=(ROWS, D)).astype(np.float32)


@pytest.mark.parametrize(
  "mesh_shape,clip,dead",
  [((1, 1), 0.0, False), ((4, 2), 0.0, True), ((4, 2), 1.0, True), ((2, 4), 0.0, False)],
  ids=["1x1", "4x2-dead", "4x2-clip-dead", "2x4"],
)
def test_the_sparse_step_gives_the_dense_steps_parameters_and_adam_state(mesh_shape, clip, dead):
  x = _data()
  saes = [trained_like(0, x), trained_like(1, x)]
  recipe = _recipe(clip_grad_norm=clip, dead_latent_loss=0.5 if dead else 0.0, dead_window_steps=3)
  dead_m = (np.arange(M) % 7 == 3) if dead else np.zeros(M, bool)
  dense, m_dense = _one_step(mesh_shape, 0, saes, x, recipe, dead_m)
  sparse, m_sparse = _one_step(mesh_shape, 64, saes, x, recipe, dead_m)

  np.testing.assert_array_equal(m_sparse["sparse"], [1, 1])  # the sparse step really ran
  np.testing.assert_array_equal(m_dense["sparse"], [0, 0])
  assert 10 < m_dense["l0"].min() and m_dense["l0"].max() < 25 and m_dense["window_fraction"].min() > 0.002
  for k in ("l0", "slots_max", "window_fraction"):  # decided on the same float values
    np.testing.assert_array_equal(m_sparse[k], m_dense[k], err_msg=k)
  for k in ("loss", "mse", "grad_norm", "dead_latent_loss"):
    np.testing.assert_allclose(m_sparse[k], m_dense[k], rtol=1e-5, err_msg=k)
  for tree in ("params", "nu"):
    a = dense["params"][0] if tree == "params" else dense["opt_state"]["nu"][0]
    b = sparse["params"][0] if tree == "params" else sparse["opt_state"]["nu"][0]
    for k in PARAM_NAMES:
      u, v = np.asarray(getattr(b, k)), np.asarray(getattr(a, k))
      assert np.linalg.norm(u - v) <= 1e-6 * np.linalg.norm(v), f"{tree} {k}"

  # latents no row touches (not active, outside the window, not dead) are bit-identical
  for i, sae in enumerate(saes):
    pre = np.asarray((x - sae.b_dec) @ sae.W_enc + sae.b_enc, np.float64)
    near = pre > np.asarray(sae.threshold) - recipe.bandwidth / 2 - 1e-3
    untouched = ~near.any(axis=0) & ~dead_m
    assert 40 < untouched.sum() < M - 40
    for tree in ("params", "nu"):
      a = dense["params"][0] if tree == "params" else dense["opt_state"]["nu"][0]
      b = sparse["params"][0] if tree == "params" else sparse["opt_state"]["nu"][0]
      for k in LATENT_LEAVES:
        leaf_a, leaf_b = np.asarray(getattr(a, k)), np.asarray(getattr(b, k))
        np.testing.assert_array_equal(leaf_b[i][untouched], leaf_a[i][untouched], err_msg=f"{tree} {k}")


@pytest.mark.parametrize("dead", [False, True], ids=["plain", "dead-latent-loss"])
def test_lazy_adam_over_several_steps_equals_dense_adam_after_the_flush(dead):
  """Adam with β1 = 0 skipping the latents a step leaves at zero gradient (`recipe.lazy_adam`, the
  default) against Adam updating every latent every step: sparse step, mesh 4×2, stacked λs, a
  new batch each step so that latents skip steps and are touched again (their moments catching
  up). The parameters, and the moments after `current_moments`, agree; untouched latents' raw
  moments are stale until then. With the dead-latent loss, latents that stop firing for two
  steps are pulled, i.e. touched, from then on."""
  x = _data()
  saes = [trained_like(0, x), trained_like(1, x)]
  batches = [_data(seed) for seed in range(10, 16)]
  runs = {}
  for lazy in (True, False):
    recipe = _recipe(lazy_adam=lazy, dead_latent_loss=0.5 if dead else 0.0, dead_window_steps=2)
    mesh = make_mesh(4, 2)
    init, shardings, step_fn = build_step(
      0, np.zeros(D), stacked.make_groups([M], [0.01, 0.1]), recipe, mesh, ROWS, 32, 0, (64,)
    )
    state = _starting_at(saes, init, shardings)
    caught_up = 0  # latents updated after skipping at least one step
    for t, batch in enumerate(batches, start=1):
      before = np.asarray(state["opt_state"]["latent_step"][0])
      state, metrics = step_fn(state, batch)
      assert np.all(np.asarray(metrics[0]["sparse"]) == 1)
      after = np.asarray(state["opt_state"]["latent_step"][0])
      caught_up += np.sum((after == t) & (before < t - 1))
    runs[lazy] = (jax.device_get(state), caught_up)
  (lazy, caught_up), (dense, _) = runs[True], runs[False]
  lazy_step, dense_step = lazy["opt_state"]["latent_step"][0], dense["opt_state"]["latent_step"][0]
  assert np.all(dense_step == len(batches))
  assert 0.1 < np.mean(lazy_step < len(batches)) < 0.9 and caught_up > 20  # skips and catch-ups both happened
  assert not np.allclose(lazy["opt_state"]["nu"][0].W_dec, dense["opt_state"]["nu"][0].W_dec)  # stale before
  flushed = stacked.current_moments(lazy, stacked.Recipe().adam)
  pairs = (("params", lazy["params"][0], dense["params"][0]), ("nu", flushed["nu"][0], dense["opt_state"]["nu"][0]))
  for tree, a, b in pairs:
    for k in PARAM_NAMES:
      u, v = np.asarray(getattr(a, k)), np.asarray(getattr(b, k))
      assert np.linalg.norm(u - v) <= 1e-6 * np.linalg.norm(v), f"{tree} {k}"
  never = lazy_step == 0  # never touched: bit for bit the dense run's parameters
  assert never.sum() > 10 or dead
  for k in LATENT_LEAVES:
    a, b = np.asarray(getattr(lazy["params"][0], k)), np.asarray(getattr(dense["params"][0], k))
    np.testing.assert_array_equal(a[never], b[never], err_msg=k)


def test_a_token_with_more_slots_than_the_capacity_runs_the_dense_step():
  x = _data(1)
  x[5] *= 10  # a row far out: the largest pre-activation of about half the latents
  sae = trained_like(2, x)
  pre = np.asarray((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
  top2 = np.sort(pre, axis=0)[-2:]
  mine = (pre.argmax(axis=0) == 5) & (top2[1] - top2[0] > 0.2)
  saes = [sae.replace(threshold=jnp.where(mine, (top2[0] + top2[1]) / 2, sae.threshold))]  # fire on row 5 alone
  recipe = _recipe()
  none_dead = np.zeros(M, bool)
  dense, m_dense = _one_step((4, 2), 0, saes, x, recipe, none_dead)
  fallback, m_fallback = _one_step((4, 2), 64, saes, x, recipe, none_dead)
  theta = np.asarray(saes[0].threshold)
  slots_b = np.sum((pre > theta) | (np.abs(pre - theta) < recipe.bandwidth / 2), axis=1)
  assert m_dense["slots_max"][0] == slots_b[5] > 64 > np.sort(slots_b)[-2]  # row 5 alone is over
  np.testing.assert_array_equal(m_fallback["sparse"], [0])
  for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(fallback), strict=True):
    np.testing.assert_array_equal(a, b)


def test_capacities_and_step_kinds_out_of_range_are_clear_errors():
  c = default_config()
  c.sweep.widths = (1024, 512)
  c.train.capacity = 600
  with pytest.raises(ValueError, match=r"train.capacity = 600: expected at most the narrowest width \(512\)"):
    validate(c)
  c.train.capacity = -1
  with pytest.raises(ValueError, match="train.capacity = -1: expected an integer >= 0"):
    validate(c)
  c.train.capacity, c.train.step = 0, "fast"
  with pytest.raises(ValueError, match=r"train.step = 'fast': expected one of \('auto', 'dense', 'sparse'\)"):
    validate(c)
  with pytest.raises(ValueError, match="train.capacity 0: slots per token must be between 1 and the SAE width 64"):
    stacked.check_capacity(0, 64)
  with pytest.raises(ValueError, match="train.capacity 65: slots per token must be between 1 and the SAE width 64"):
    build_step(0, np.zeros(D), stacked.make_groups([64], [1e-3]), stacked.Recipe(), make_mesh(1, 1), 8, 0, 0, (65,))
  with pytest.raises(ValueError, match=r"train.step 'fast': expected one of \('auto', 'dense', 'sparse'\)"):
    StepChooser("fast", 0, [64], lambda caps: None)


def test_the_automatic_capacity_is_half_again_the_slots_seen_within_a_quarter_of_the_width():
  assert auto_capacity(40, 16_384) == 64
  assert auto_capacity(200, 16_384) == 320
  assert auto_capacity(200, 512) == 128
  assert auto_capacity(5_000, 1 << 20) == 1024


class _Timed:
  """A stand-in for a compiled step that takes a known time: what `auto` is meant to measure."""

  def __init__(self, seconds, log):
    self.seconds, self.log = seconds, log

  def lower(self, state, x):
    return self

  def compile(self):
    return self

  def __call__(self, state, x):
    time.sleep(self.seconds)
    self.log.append(self.seconds)
    return state, {}


@pytest.mark.parametrize("sparse_seconds,switches", [(0.01, True), (0.08, False)])
def test_auto_times_both_steps_and_keeps_the_faster(sparse_seconds, switches):
  log = []
  make = lambda caps: _Timed(sparse_seconds if caps else 0.04, log)
  chooser = StepChooser("auto", 0, [4096], make, log_every=10)
  state = jnp.zeros(())
  chooser.observe(10, [3000.0])  # more slots than a quarter of the width: no timing yet
  for s in range(10, 20):
    chooser.run(s, state, None)
  assert chooser.running == "dense" and set(log) == {0.04}
  chooser.observe(20, [100.0])
  for s in range(20, 30):
    chooser.run(s, state, None)
  assert chooser.capacities == (160,)
  assert log[10:14] == [0.04, sparse_seconds, 0.04, sparse_seconds]  # alternated, two of each
  assert chooser.running == ("sparse" if switches else "dense")
  assert set(log[14:]) == {sparse_seconds if switches else 0.04}
  assert chooser.record()["probes"][0]["step"] == 24
  assert chooser.record()["next_probe"] == (0 if switches else 124)
  resumed = StepChooser("auto", 0, [4096], make, chooser.record(), log_every=10)
  assert resumed.record() == chooser.record()


def test_a_run_resumed_with_another_step_or_capacity_follows_the_new_config():
  record = StepChooser("auto", 0, [4096], None).record() | {"running": "sparse", "capacities": [160]}
  assert StepChooser("dense", 0, [4096], None, record).running == "dense"
  assert StepChooser("auto", 0, [4096], None, record).capacities == (160,)
  assert StepChooser("auto", 96, [4096], None, record).capacities == (96,)


def test_sparse_runs_the_dense_step_for_a_group_whose_slots_did_not_fit():
  built = []
  make = lambda caps: built.append(caps) or _Timed(0.0, [])
  chooser = StepChooser("sparse", 64, [1024, 2048], make, log_every=10)
  state = jnp.zeros(())
  chooser.run(0, state, None)
  chooser.observe(10, [80.0, 30.0])  # the first group's tokens had more slots than 64
  chooser.run(10, state, None)
  chooser.observe(20, [200.0, 300.0])
  chooser.run(20, state, None)
  chooser.observe(30, [50.0, 40.0])
  chooser.run(30, state, None)
  assert built == [(64, 64), (0, 64), ()]  # neither fits: the dense step; each variant compiled once
  assert chooser.record()["fits"] == [True, True]
