"""TopK and BatchTopK SAEs with AuxK: the step against jax.grad and optax Adam (dense and sparse,
blocked, stacked, on a 4×2 mesh), the selection on a sharded latent axis against one device and
`lax.top_k`, recovery of a planted dictionary, AuxK reviving dead latents, a stacked sweep against
each SAE alone, and bad sweeps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from scope_jax.config import default_config, validate
from scope_jax.data import ArraySource
from scope_jax.parallel.mesh import make_mesh
from scope_jax.sae import training_pre, unstack
from scope_jax.sae.model import PARAM_NAMES, init_sae
from scope_jax.sae.topk import row_threshold, topk_mask
from scope_jax.train import stacked, train
from scope_jax.train.optim import project_rows
from scope_jax.train.params import TrainParams
from tests.train.steps import build_step
from tests.train.test_step import planted_dictionary

ALPHA = 1 / 32


def _data(n=4096, d=16, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d)).astype(np.float32)


def _masks(pre, k, activation, dead, k_aux):
  """The selection and AuxK's, written plainly: `lax.top_k` per row (TopK), a sort of the whole
  batch (BatchTopK), `lax.top_k` over the dead latents (AuxK); ReLU'd values only."""
  relu = jnp.maximum(pre, 0.0)
  if activation == "topk":
    kth = lax.top_k(relu, k)[0][:, -1:]
  else:
    kth = jnp.sort(relu.ravel())[-k * pre.shape[0]]
  kept = (relu >= kth) & (pre > 0)
  n_dead = int(np.sum(dead))
  if not n_dead:
    return kept, jnp.zeros_like(kept), 0.0
  aux_kth = lax.top_k(jnp.where(dead, relu, 0.0), min(k_aux, n_dead))[0][:, -1:]
  return kept, dead & (relu >= aux_kth) & (pre > 0), min(n_dead / k_aux, 1.0)


def _reference_loss(sae, x, y, k, activation, dead, k_aux, prefixes, transcoder):
  """The loss with the selection held fixed: ∂f/∂z is 1 on the kept latents; each prefix's
  reconstruction error of the target `y` summed (the whole width last); AuxK's target is the
  whole width's residual, a constant, its decoding has no b_dec and its variance is the target's;
  a transcoder's pre-activations take its input without `b_dec`."""
  pre = training_pre(sae, x, transcoder)
  kept, aux, scale = jax.lax.stop_gradient(_masks(pre, k, activation, dead, k_aux))
  f = pre * kept
  loss = 0.0
  for end in prefixes:
    yhat = f[:, :end] @ sae.W_dec[:end] + sae.b_dec
    loss = loss + jnp.mean(jnp.sum(jnp.square(y - yhat), -1))
  e = jax.lax.stop_gradient(y - yhat)
  ehat = (pre * aux) @ sae.W_dec
  variance = jnp.mean(jnp.sum(jnp.square(y - y.mean(0)), -1))
  return loss + ALPHA * scale * jnp.mean(jnp.sum(jnp.square(ehat - e), -1)) / variance


def _follow_optax_adam(
  step_fn, state, sae, recipe, rows, d_in, k, activation, dead_m, k_aux, prefixes, capacity, aux_floor
):
  """Three steps of `step_fn` on the thirds of `rows` against optax's Adam fed `jax.grad` of
  `_reference_loss`, the decoder projection and renormalization around it, and BatchTopK's θ as an
  EMA (rate 0.01) of the smallest kept value; `aux_floor`: AuxK's loss must pass this share of the
  loss (None: not checked); `d_in`: a transcoder's input columns, or None."""
  transcoder, m = d_in is not None, sae.W_dec.shape[0]
  opt = optax.chain(
    optax.scale_by_rms(decay=recipe.adam_b2, eps=recipe.adam_eps, eps_in_sqrt=False, bias_correction=True),
    optax.scale(-recipe.lr),
  )
  opt_state, ref, theta = opt.init(sae), sae, 0.0
  for s, r in enumerate(np.split(rows, 3)):
    x, y = (r[:, :d_in], r[:, d_in:]) if transcoder else (r, r)
    args = (k, activation, dead_m, k_aux, (*prefixes, m), transcoder)
    loss, g = jax.value_and_grad(_reference_loss)(ref, x, y, *args)
    pre = training_pre(ref, x, transcoder)
    kept = _masks(pre, k, activation, dead_m, k_aux)[0]
    dead_m = dead_m & ~np.asarray(kept).any(axis=0)  # a dead latent that fires is alive at the next step
    theta = 0.99 * theta + 0.01 * float(jnp.min(jnp.where(kept, pre, jnp.inf)))  # BatchTopK's EMA (rate 0.01)
    state, stats = step_fn(state, r)
    assert stats[0]["sparse"][0] == (capacity > 0)
    np.testing.assert_allclose(stats[0]["loss"][0], loss, rtol=1e-5, err_msg=f"step {s}")
    if aux_floor is not None:
      assert stats[0]["auxk_loss"][0] > aux_floor * loss  # AuxK is really exercised
    updates, opt_state = opt.update(g.replace(W_dec=project_rows(g.W_dec, ref.W_dec)), opt_state)
    ref = optax.apply_updates(ref, updates)
    ref = ref.replace(W_dec=ref.W_dec / jnp.linalg.norm(ref.W_dec, axis=-1, keepdims=True), threshold=sae.threshold)
    got = unstack(jax.device_get(state["params"][0]).to_sae())[0]
    for name in PARAM_NAMES:
      if name != "threshold":
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-4, atol=2e-6, err_msg=f"{s} {name}")
    expected_theta = theta if activation == "batchtopk" else 0.0  # TopK has no θ
    np.testing.assert_allclose(got.threshold, np.full(m, expected_theta), rtol=1e-5, err_msg=f"step {s} θ")
  return stats


def _start(d, m, seed):
  """A training-form SAE as TopK initializes it (θ 0), biases non-trivial."""
  rng = np.random.default_rng(seed)
  sae = init_sae(jax.random.key(seed), d, m, 0.0)
  return sae.replace(
    b_enc=jnp.asarray(rng.normal(0, 0.3, m), jnp.float32), b_dec=jnp.asarray(rng.normal(0, 0.2, d), jnp.float32)
  )


def _with(state, sae, shardings, dead_m=None, window=0):
  group = TrainParams.from_sae(jax.tree.map(lambda a: a[None], sae))
  state = state | {"params": jax.device_put((group,), shardings["params"])}
  if dead_m is not None:
    since = np.where(dead_m, window, 0)[None].astype(np.int32)
    state["since_fired"] = (jax.device_put(since, state["since_fired"][0].sharding),)
  return state


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("auxk", [False, True], ids=["plain", "auxk"])
@pytest.mark.parametrize("capacity", [0, 48], ids=["dense", "sparse"])
def test_steps_follow_optax_adam_on_jax_grad_of_the_loss(activation, auxk, capacity):
  """Three real steps (blocked, sharded 4×2) against optax's Adam fed `jax.grad` of the loss with
  the selection held fixed, the decoder projection and renormalization around it. With AuxK a
  third of the latents have been silent for the dead window (outranked on every row), and AuxK
  (k_aux 6) decodes the residual with them."""
  d, m, k, batch, k_aux = 16, 48, 5, 64, 6
  recipe = stacked.Recipe(lr=3e-3, lr_warmup_steps=0, auxk_coefficient=ALPHA if auxk else 0.0, auxk_k=k_aux)
  recipe = recipe.__class__(**{**recipe.__dict__, "dead_window_steps": 10**6 if auxk else 1000})
  groups = stacked.make_groups([m], [k], activation=activation)
  init, shardings, step_fn = build_step(
    0, np.zeros(d), groups, recipe, make_mesh(4, 2), batch, 4, capacities=(capacity,)
  )
  sae = _start(d, m, seed=3)
  dead_m = (np.arange(m) % 3 == 0) if auxk else np.zeros(m, bool)
  # dead latents outranked on every row (small positive values): AuxK decodes them at every step
  sae = sae.replace(W_enc=jnp.where(dead_m, 0.05 * sae.W_enc, sae.W_enc), b_enc=jnp.where(dead_m, 0.05, sae.b_enc))
  state = _with(init(), sae, shardings, dead_m, 10**6)
  rows = _data(3 * batch, d, seed=4)
  stats = _follow_optax_adam(
    step_fn, state, sae, recipe, rows, None, k, activation, dead_m, k_aux, (), capacity, 1e-3 if auxk else None
  )
  l0 = float(stats[0]["l0"][0])
  assert l0 == k if activation == "topk" else abs(l0 - k) < 1e-9  # BatchTopK: k on average over the batch


@pytest.mark.parametrize("capacity", [0, 48], ids=["dense", "sparse"])
@pytest.mark.parametrize("form", ["matryoshka", "transcoder"])
def test_batchtopk_matryoshka_and_transcoder_steps_follow_optax_adam_on_jax_grad(form, capacity):
  """BatchTopK with AuxK where the references train it beyond plain SAEs: Matryoshka prefixes
  (16, 32 of 48 latents, the loss summed over them) and a transcoder (12 inputs to 16 targets),
  three steps (blocked, sharded 4×2) against optax's Adam fed `jax.grad`."""
  d_in, d, m, k, batch, k_aux = 12, 16, 48, 5, 64, 6
  transcoder = form == "transcoder"
  prefixes = (16, 32) if form == "matryoshka" else ()
  recipe = stacked.Recipe(lr=3e-3, lr_warmup_steps=0, auxk_coefficient=ALPHA, auxk_k=k_aux)
  recipe = recipe.__class__(**{**recipe.__dict__, "dead_window_steps": 10**6})
  groups = stacked.make_groups([m], [k], prefixes=prefixes, activation="batchtopk")
  rows = _data(3 * batch, d_in + d if transcoder else d, seed=4)
  if transcoder:  # a target that depends on the input
    rows[:, d_in:] += rows[:, :d_in] @ np.random.default_rng(5).normal(0, 0.5, (d_in, d)).astype(np.float32)
  mean = np.zeros(d_in + d if transcoder else d)
  init, shardings, step_fn = build_step(
    0,
    mean,
    groups,
    recipe,
    make_mesh(4, 2),
    batch,
    4,
    capacities=(capacity,),
    kind="transcoder" if transcoder else "sae",
    d_in=d_in if transcoder else None,
  )
  sae = _start(d, m, seed=3)
  if transcoder:
    w = np.random.default_rng(6).normal(0, 0.3, (d_in, m)).astype(np.float32)
    sae = sae.replace(W_enc=jnp.asarray(w))
  dead_m = np.arange(m) % 3 == 0
  sae = sae.replace(W_enc=jnp.where(dead_m, 0.05 * sae.W_enc, sae.W_enc), b_enc=jnp.where(dead_m, 0.05, sae.b_enc))
  state = _with(init(), sae, shardings, dead_m, 10**6)
  d_in = d_in if transcoder else None
  _follow_optax_adam(step_fn, state, sae, recipe, rows, d_in, k, "batchtopk", dead_m, k_aux, prefixes, capacity, 1e-4)


def test_the_selection_on_a_model_sharded_latent_axis_is_the_unsharded_one_and_lax_top_k_s():
  """One step's selection, L0 and parameters on 1×1, 4×2 and 2×4 meshes (blocks of 4 latents):
  the thresholds come from integer counts, so the kept latents are the same bit for bit; and they
  are `lax.top_k`'s on these (tie-free) values."""
  d, m, k, batch = 16, 64, 7, 64
  x = _data(batch, d, seed=5)
  sae = _start(d, m, seed=6)
  recipe = stacked.Recipe(lr=3e-3, lr_warmup_steps=0, auxk_coefficient=0.0)
  kept = {}
  for shape in [(1, 1), (4, 2), (2, 4)]:
    init, shardings, step_fn = build_step(
      0, np.zeros(d), stacked.make_groups([m], [k], activation="topk"), recipe, make_mesh(*shape), batch, 4
    )
    state, stats = step_fn(_with(init(), sae, shardings), x)
    moved = np.asarray(jax.device_get(state["params"][0]).W_dec[0]) != np.asarray(sae.W_dec)
    kept[shape] = (moved.any(axis=-1), float(stats[0]["l0"][0]))
  assert kept[(1, 1)][0].sum() > k  # the batch's rows keep different latents
  for shape in [(4, 2), (2, 4)]:
    np.testing.assert_array_equal(kept[shape][0], kept[(1, 1)][0])
    assert kept[shape][1] == kept[(1, 1)][1] == k
  pre = np.asarray(training_pre(sae, x))
  by_top_k = np.zeros_like(pre, bool)
  np.put_along_axis(by_top_k, np.asarray(lax.top_k(jnp.asarray(pre), k)[1]), True, axis=1)
  np.testing.assert_array_equal(np.asarray(topk_mask(jnp.asarray(pre), k)), by_top_k & (pre > 0))
  np.testing.assert_array_equal(kept[(1, 1)][0], by_top_k.any(axis=0))


def test_row_threshold_is_the_kth_largest_relu_value_ties_kept():
  pre = jnp.asarray([[0.5, -1.0, 2.0, 0.5, 3.0], [-1.0, -2.0, 0.25, -0.5, -3.0]])
  np.testing.assert_array_equal(row_threshold(pre, 2), [2.0, 0.0])  # row 2: one positive value, then zeros
  np.testing.assert_array_equal(row_threshold(pre, 4), [0.5, 0.0])
  mask = np.asarray(topk_mask(pre, 4))
  assert mask[0].tolist() == [True, False, True, True, True]  # the tied 0.5s both kept
  assert mask[1].tolist() == [False, False, True, False, False]  # ReLU: negatives never kept


def _topk_config(activation, widths, ks, steps, batch=64):
  c = default_config()
  c.sweep.activation, c.sweep.widths, c.sweep.k = activation, tuple(widths), tuple(ks)
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = batch, steps, 5, 10**6
  c.recipe.lr, c.recipe.lr_warmup_steps = 5e-3, 5
  c.train.step = "dense"  # not `auto`: its timing could choose differently for the sweep and a lone SAE
  return c


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_a_stacked_sweep_equals_each_sae_trained_alone(activation, tmp_path):
  mesh = make_mesh(data=4, model=2)
  widths, ks = [32, 64], [3, 8]
  run = lambda ws, kk, where: train(
    _topk_config(activation, ws, kk, 15), tmp_path / where, ArraySource(_data(), 64, mesh), progress=False
  )
  together = run(widths, ks, "sweep")
  for gi, width in enumerate(widths):
    for ki, k in enumerate(ks):
      alone = run([width], [k], f"{width}-{k}")["params"][0]
      got = unstack(together["params"][gi])[ki]
      for name in PARAM_NAMES:
        np.testing.assert_allclose(
          getattr(got, name), np.asarray(getattr(alone, name))[0], rtol=2e-4, atol=2e-5, err_msg=f"{width} k{k} {name}"
        )
  if activation == "batchtopk":  # θ followed the batches' smallest kept value, one θ for every latent
    theta = np.asarray(together["params"][0].threshold)
    assert np.all(theta > 0) and np.all(theta == theta[:, :1])


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_training_recovers_a_planted_sparse_dictionary(activation, tmp_path):
  """64 planted directions, ~4 active per row: ≥ 90% recovered at decoder cosine ≥ 0.9."""
  directions, x = planted_dictionary()
  c = _topk_config(activation, [128], [4, 6], 3000, batch=512)
  c.recipe.lr, c.recipe.lr_warmup_steps = 3e-3, 50
  state = train(
    c, tmp_path, ArraySource(x.astype(np.float32), 512, make_mesh(devices=jax.devices()[:1])), progress=False
  )
  W_dec = np.asarray(state["params"][0].W_dec)  # [k, M, d]
  recovered = [float(np.mean((directions @ w.T).max(axis=1) >= 0.9)) for w in W_dec]
  assert max(recovered) >= 0.9, recovered


@pytest.mark.parametrize("auxk", [True, False], ids=["auxk", "none"])
def test_auxk_revives_planted_dead_latents(auxk):
  """A quarter of the latents start outranked on every row (their encoder rows and biases scaled
  down 100×: small positive values, never among a row's top k), so they are dead and get no gradient
  from the reconstruction. AuxK decodes the residual with them: in 1,500 steps most come back and
  fire; without it none does."""
  d, m, k, batch = 32, 64, 4, 256
  _, x = planted_dictionary(d=d, k=32, n=8192, seed=2)
  x = (x / np.sqrt(np.mean(np.sum(np.square(x - x.mean(0)), -1)))).astype(np.float32)
  recipe = stacked.Recipe(lr=3e-3, lr_warmup_steps=0, auxk_coefficient=ALPHA if auxk else 0.0, dead_window_steps=10)
  mesh = make_mesh(devices=jax.devices()[:1])
  init, shardings, step_fn = build_step(
    0, x.mean(0), stacked.make_groups([m], [k], activation="topk"), recipe, mesh, batch
  )
  planted = np.arange(m) % 4 == 0
  sae = _start(d, m, seed=5)
  sae = sae.replace(
    W_enc=jnp.where(planted, 0.01 * sae.W_enc, sae.W_enc), b_enc=jnp.where(planted, 0.01, jnp.abs(sae.b_enc))
  )
  state = _with(init(), sae, shardings)
  fired_at_start = _fires(state, x, k)
  assert not fired_at_start[planted].any() and fired_at_start[~planted].mean() > 0.5
  for s in range(1500):
    state, stats = step_fn(state, x[(s * batch) % len(x) :][:batch])
  revived = float(np.mean(_fires(state, x, k)[planted]))
  if auxk:
    assert revived >= 0.6, revived  # 0.75 measured
  else:
    assert revived == 0.0, revived


def _fires(state, x, k) -> np.ndarray:
  """Whether each latent is among some row's top k on `x`."""
  sae = unstack(jax.device_get(state["params"][0]).to_sae())[0]
  return np.asarray(topk_mask(training_pre(sae, jnp.asarray(x)), k)).any(axis=0)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("sweep.k", (64,), r"sweep.k = \(64,\): expected every k below every width \(the narrowest is 64\)"),
    ("sweep.k", (0,), r"sweep.k = \(0,\): expected positive integers"),
    ("sweep.k", (), r"sweep.k = \(\): expected positive integers"),
    ("recipe.auxk_k", 65, r"recipe.auxk_k = 65: expected at most the narrowest width \(64\)"),
    ("recipe.dead_latent_loss", 0.01, r"recipe.dead_latent_loss = 0.01: a JumpReLU term"),
    ("recipe.threshold_ema", 0.0, r"recipe.threshold_ema = 0.0: expected a rate in \(0, 1\]"),
  ],
)
def test_bad_topk_sweeps_are_clear_errors_naming_field_and_value(field, value, message):
  c = _topk_config("batchtopk", [64, 128], [8], 10)
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=message):
    validate(c)
  with pytest.raises(ValueError, match=r"sweep.k \[64\] .*|sweep.k 64 must be below every width"):
    stacked.make_groups([64], [64], activation="topk")
  with pytest.raises(ValueError, match=r"sweep.k \[0\]: expected positive integers"):
    stacked.make_groups([64], [0], activation="topk")


def test_topk_transcoders_and_matryoshka_topk_are_refused_naming_what_to_use():
  c = _topk_config("topk", [64], [8], 10)
  c.sweep.prefixes = (16,)
  with pytest.raises(ValueError, match="sweep.prefixes = \\(16,\\): .* use sweep.activation 'batchtopk'"):
    validate(c)
  c = _topk_config("topk", [64], [8], 10)
  c.kind, c.site = "transcoder", "mlp_in.1"
  with pytest.raises(ValueError, match="kind = 'transcoder': sweep.activation 'topk' trains SAEs only"):
    validate(c)
  c = _topk_config("jumprelu", [64], [8], 10)
  with pytest.raises(ValueError, match=r"sweep.k = \(8,\): expected \(\) for sweep.activation 'jumprelu'"):
    validate(c)
