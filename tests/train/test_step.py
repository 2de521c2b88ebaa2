"""The sweep step: the loss against SAELens, decoder constraints, stacking, recovery of a planted
dictionary, and bad sweep configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from scope_jax.config import default_config
from scope_jax.data import ArraySource
from scope_jax.parallel.mesh import make_mesh, sae_model_axis
from scope_jax.sae import heaviside, jumprelu, training_pre, unstack
from scope_jax.sae.loss import LossSpec
from scope_jax.sae.model import PARAM_NAMES
from scope_jax.train import stacked, train
from scope_jax.train.optim import lr_schedule, project_rows
from scope_jax.train.params import TrainParams
from tests.sae.test_io import random_sae
from tests.train.steps import build_step


def _saelens_loss_and_gradients(sae, x, lam, spec, dead_m=None):
  cfg = JumpReLUTrainingSAEConfig(
    d_in=sae.d_in,
    d_sae=sae.width,
    jumprelu_bandwidth=spec.bandwidth,
    apply_b_dec_to_input=True,
    target_l0=spec.target_l0,
    jumprelu_sparsity_loss_mode="quadratic" if spec.sparsity_loss == "quadratic" else "step",
    pre_act_loss_coefficient=spec.dead_latent_loss or None,
  )
  lens = JumpReLUTrainingSAE(cfg)
  with torch.no_grad():
    for k in PARAM_NAMES:
      getattr(lens, k).copy_(torch.tensor(np.asarray(getattr(sae, k))))
  dead = None if dead_m is None else torch.tensor(dead_m)
  out = lens.training_forward_pass(
    TrainStepInput(
      sae_in=torch.tensor(x), coefficients={"l0": lam}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )
  )
  out.loss.backward()
  return out, {k: getattr(lens, k).grad.numpy() for k in PARAM_NAMES}


def _with_params(state, group_saes, shardings):
  """`state` with its groups' parameters set from stacked training-form `SAE`s."""
  group_params = tuple(TrainParams.from_sae(p) for p in group_saes)
  return state | {"params": jax.device_put(group_params, shardings["params"])}


@pytest.mark.parametrize("mode", ["l0", "quadratic", "l0+dead"])
@pytest.mark.parametrize("mesh_shape,block", [((1, 1), 0), ((4, 2), 8)])
@pytest.mark.parametrize("capacity", [0, 80], ids=["dense", "sparse"])
def test_one_step_follows_the_saelens_gradients(mode, mesh_shape, block, capacity):
  """With Adam's ε far above |g| the update is -lr/ε · g, so one real training step (blocked,
  sharded, stacked; dense, or sparse with room for every slot) reveals the gradient it used; it
  must be SAELens' autograd gradient. "l0+dead": a third of the latents have not fired for the
  dead window, and the dead-latent loss (SAELens' pre_act_loss) is on."""
  d, m, lambdas, eps, batch = 24, 80, [0.3, 0.05], 0.05, 64
  step_size = 1e-3  # lr / ε
  sae = random_sae(d, m, seed=7)
  x = np.random.default_rng(8).normal(0, 1, (batch, d)).astype(np.float32)
  recipe = stacked.Recipe(
    lr=1e3,
    adam_eps=1e6,
    lr_warmup_steps=0,
    sparsity_warmup_steps=0,
    bandwidth=eps,
    sparsity_loss=mode.removesuffix("+dead"),
    target_l0=10.0 if mode == "quadratic" else None,
    dead_latent_loss=0.7 if mode == "l0+dead" else 0.0,
    dead_window_steps=5,
  )
  dead_m = (np.arange(m) % 3 == 0) if mode == "l0+dead" else None
  mesh = make_mesh(*mesh_shape)
  init, shardings, step_fn = build_step(
    0, np.zeros(d), stacked.make_groups([m], lambdas), recipe, mesh, batch, block, 0, (capacity,)
  )
  pair = jax.tree.map(lambda a: jnp.stack([a, a]), sae)
  state = _with_params(init(), (pair,), shardings)
  if dead_m is not None:
    since = np.where(dead_m, 5, 0)[None].repeat(2, 0).astype(np.int32)
    state["since_fired"] = (jax.device_put(since, state["since_fired"][0].sharding),)
  state, metrics = step_fn(state, x)
  np.testing.assert_array_equal(metrics[0]["sparse"], [capacity > 0] * 2)
  in_window = np.abs(np.asarray(training_pre(sae, x)) - np.asarray(sae.threshold)) < eps / 2
  assert in_window.sum() > 20  # threshold gradients really are exercised
  for i, lam in enumerate(lambdas):
    out, grads = _saelens_loss_and_gradients(sae, x, lam, recipe.loss, dead_m)
    if dead_m is not None:
      assert out.losses["pre_act_loss"].item() > 0.05 * out.loss.item()
      np.testing.assert_allclose(metrics[0]["dead_latent_loss"][i], out.losses["pre_act_loss"].item(), rtol=1e-5)
    new = unstack(jax.device_get(state["params"][0]).to_sae())[i]
    assert 5 < float(metrics[0]["l0"][i]) < 75
    np.testing.assert_allclose(metrics[0]["loss"][i], out.loss.item(), rtol=1e-5)
    np.testing.assert_allclose(metrics[0]["mse"][i], out.losses["mse_loss"].item(), rtol=1e-5)
    for k in ("W_enc", "b_enc", "b_dec", "threshold"):
      used = (np.asarray(getattr(sae, k)) - np.asarray(getattr(new, k))) / step_size
      np.testing.assert_allclose(used, grads[k], rtol=2e-3, atol=2e-4, err_msg=f"λ {lam} {k}")
    W_dec = np.asarray(sae.W_dec)
    g = grads["W_dec"] - np.sum(grads["W_dec"] * W_dec, -1, keepdims=True) * W_dec  # projected
    expected = W_dec - step_size * g
    np.testing.assert_allclose(new.W_dec, expected / np.linalg.norm(expected, axis=-1, keepdims=True), atol=1e-6)


def _composed_loss(sae, x, lam, spec):
  """The loss written with the public custom-VJP functions, differentiated by jax.grad."""
  pre = training_pre(sae, x)
  xhat = jumprelu(pre, sae.threshold, spec.bandwidth) @ sae.W_dec + sae.b_dec
  l0_b = jnp.sum(heaviside(pre, sae.threshold, spec.bandwidth), axis=-1)
  return jnp.mean(jnp.sum(jnp.square(x - xhat), -1)) + lam * jnp.mean(spec.penalty(l0_b))


@pytest.mark.parametrize(
  "b1,clip,free",
  [(0.0, 0.0, None), (0.9, 0.0, None), (0.0, 0.05, None), (0.0, 0.05, 4_096)],
  ids=["adam-b1-0", "adam-b1-0.9", "clip-gradients-kept", "clip-gradients-formed-again"],
)
@pytest.mark.parametrize("capacity", [0, 32], ids=["dense", "sparse"])
def test_steps_follow_optax_adam_on_the_custom_vjp_gradients(b1, clip, free, capacity):
  """Several real steps (blocked, sharded; dense, or sparse with room for every slot) against
  optax's Adam fed `jax.grad` through the public `jumprelu`/`heaviside`, with optax's global-norm
  clipping before it and the decoder projection and renormalization around it. Clipped, the
  blocks' gradients are kept between the step's passes (blocks of 4, the host's budget) or, with
  4 KB free (the memory rule's blocks, no room left), formed again from the clipped cotangents."""
  d, m, lam, batch = 16, 32, 0.05, 64
  recipe = stacked.Recipe(
    lr=3e-3, lr_warmup_steps=0, sparsity_warmup_steps=0, bandwidth=0.05, adam_b1=b1, clip_grad_norm=clip
  )
  mesh = make_mesh(4, 2)
  groups = stacked.make_groups([m], [lam])
  block = 4 if free is None else 0
  init, shardings, step_fn = build_step(
    0, np.zeros(d), groups, recipe, mesh, batch, block, free_bytes=free, capacities=(capacity,)
  )
  sae = random_sae(d, m, seed=3)
  state = _with_params(init(), (jax.tree.map(lambda a: a[None], sae),), shardings)
  scale = (
    optax.scale_by_adam(b1, recipe.adam_b2, recipe.adam_eps)
    if b1
    else optax.scale_by_rms(decay=recipe.adam_b2, eps=recipe.adam_eps, eps_in_sqrt=False, bias_correction=True)
  )
  opt = optax.chain(scale, optax.scale(-recipe.lr))
  opt_state, ref = opt.init(sae), sae
  for s, x in enumerate(np.split(_data(4 * batch, d, seed=4), 4)):
    state, stats = step_fn(state, x)
    assert stats[0]["sparse"][0] == (capacity > 0)
    assert stats[0]["keeps_gradients"][0] == (clip > 0 and free is None)
    assert stats[0]["latent_block"][0] < m // 2  # more than one block per device
    g = jax.grad(_composed_loss)(ref, x, lam, recipe.loss)
    np.testing.assert_allclose(stats[0]["grad_norm"][0], optax.global_norm(g), rtol=1e-4)
    if clip:
      assert optax.global_norm(g) > clip  # the clip acts on every step
      g, _ = optax.clip_by_global_norm(clip).update(g, None)
    updates, opt_state = opt.update(g.replace(W_dec=project_rows(g.W_dec, ref.W_dec)), opt_state)
    ref = optax.apply_updates(ref, updates)
    ref = ref.replace(
      W_dec=ref.W_dec / jnp.linalg.norm(ref.W_dec, axis=-1, keepdims=True), threshold=jnp.maximum(ref.threshold, 0.0)
    )
    got = unstack(jax.device_get(state["params"][0]).to_sae())[0]
    for k in PARAM_NAMES:
      np.testing.assert_allclose(getattr(got, k), getattr(ref, k), rtol=1e-4, atol=2e-6, err_msg=f"step {s} {k}")
  assert not np.allclose(ref.threshold, sae.threshold)


def test_gradient_projection_removes_the_component_along_each_decoder_row():
  w = np.asarray(random_sae(16, 40).W_dec)
  g = np.random.default_rng(1).normal(size=w.shape).astype(np.float32)
  projected = np.asarray(project_rows(g, w))
  np.testing.assert_allclose(np.sum(projected * w, axis=-1), 0, atol=1e-5)
  removed = g - projected  # what was taken away is parallel to the row
  np.testing.assert_allclose(np.abs(np.sum(removed * w, -1)), np.linalg.norm(removed, axis=-1), rtol=1e-4)


def test_learning_rate_warms_up_along_a_cosine_from_a_tenth():
  schedule = lr_schedule(7e-5, 1000)
  np.testing.assert_allclose(
    [schedule(0), schedule(500), schedule(1000), schedule(5000)], [7e-6, 7e-5 * 0.55, 7e-5, 7e-5], rtol=1e-5
  )


def test_learning_rate_decays_linearly_to_zero_over_the_last_steps():
  schedule = lr_schedule(1e-3, 100, decay_steps=400, total_steps=2000)
  np.testing.assert_allclose(
    [schedule(0), schedule(100), schedule(1600), schedule(1800), schedule(1999), schedule(2000)],
    [1e-4, 1e-3, 1e-3, 5e-4, 2.5e-6, 0.0],
    rtol=1e-5,
    atol=1e-12,
  )
  with pytest.raises(ValueError, match=r"recipe.lr_decay_steps 3000 is longer than the run \(train.steps 2000\)"):
    lr_schedule(1e-3, 100, decay_steps=3000, total_steps=2000)


def _data(n=4096, d=16, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d)).astype(np.float32)


def test_decoder_rows_have_unit_norm_after_every_step():
  mesh = make_mesh(data=4, model=2)
  groups = stacked.make_groups([32, 64], [1e-3, 1e-1])
  recipe = stacked.Recipe(lr=1e-2, lr_warmup_steps=0, sparsity_warmup_steps=0)
  init, _, step_fn = build_step(0, np.zeros(16), groups, recipe, mesh, 64)
  state, source = init(), ArraySource(_data(), 64, mesh)
  for s in range(5):
    before = np.asarray(state["params"][0].W_dec).copy()
    state, metrics = step_fn(state, source.batch(s))
    for p in state["params"]:
      np.testing.assert_allclose(np.linalg.norm(np.asarray(p.W_dec), axis=-1), 1, atol=1e-5)
    assert not np.allclose(before, state["params"][0].W_dec)
    assert np.all(np.asarray(state["params"][1].threshold) >= 0)


def _train_sweep(widths, lambdas, tmp_path, steps=25):
  mesh = make_mesh(data=4, model=2)
  c = default_config()
  c.sweep.widths, c.sweep.l1_coefficients = widths, lambdas
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 64, steps, 5, 1000
  c.recipe.lr, c.recipe.lr_warmup_steps, c.recipe.sparsity_warmup_steps = 5e-3, 5, 10
  c.recipe.lr_decay_steps = 10  # the run's length reaches the schedule
  c.recipe.bandwidth = 0.05
  c.train.step = "dense"  # not `auto`, whose timing could choose differently for the sweep and a lone SAE
  return train(c, tmp_path, ArraySource(_data(), 64, mesh), progress=False)


def test_a_stacked_sweep_equals_each_sae_trained_alone(tmp_path):
  widths, lambdas = [32, 64], [1e-3, 3e-2, 1e-1]
  together = _train_sweep(widths, lambdas, tmp_path / "sweep")
  l0s = []
  for gi, width in enumerate(widths):
    for li, lam in enumerate(lambdas):
      alone = _train_sweep([width], [lam], tmp_path / f"{width}-{lam}")["params"][0]
      got = unstack(together["params"][gi])[li]
      for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        np.testing.assert_allclose(
          getattr(got, k), np.asarray(getattr(alone, k))[0], rtol=2e-4, atol=2e-5, err_msg=f"width {width} λ {lam} {k}"
        )
      l0s.append(float(np.mean(np.asarray(got.threshold))))
  # the SAEs really differ: λ pushes thresholds up
  assert l0s[0] < l0s[2] and l0s[3] < l0s[5]


def planted_dictionary(d=64, k=64, n=40_000, seed=1) -> tuple[np.ndarray, np.ndarray]:
  """(k unit directions [k, d], n float64 rows [n, d] each a sparse positive mix of ~4 of them)."""
  rng = np.random.default_rng(seed)
  directions = rng.normal(size=(k, d))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  magnitudes = rng.uniform(1, 3, (n, k)) * (rng.random((n, k)) < 4 / k)  # ~4 active features per row
  return directions, magnitudes @ directions


def test_training_recovers_a_planted_sparse_dictionary(tmp_path):
  directions, x = planted_dictionary()
  x = x.astype(np.float32)
  mesh = make_mesh(devices=jax.devices()[:1])
  c = default_config()
  c.sweep.widths, c.sweep.l1_coefficients = [128], [1e-2, 3e-2, 1e-1]
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 512, 3000, 500, 10**6
  c.recipe.lr, c.recipe.lr_warmup_steps, c.recipe.sparsity_warmup_steps = 3e-3, 50, 200
  state = train(c, tmp_path, ArraySource(x, 512, mesh, seed=0), progress=False)
  W_dec = np.asarray(state["params"][0].W_dec)  # [λ, M, d]
  matched = [(directions @ w.T).max(axis=1) >= 0.9 for w in W_dec]  # per planted direction
  recovered = [float(np.mean(m)) for m in matched]
  assert max(recovered) >= 0.9, recovered
  l0 = [
    float(
      np.mean(
        np.sum(((x[:2048] / np.sqrt(np.mean(np.sum(x**2, 1)))) - p.b_dec) @ p.W_enc + p.b_enc > p.threshold, axis=1)
      )
    )
    for p in unstack(jax.device_get(state["params"][0]).to_sae())
  ]
  assert l0[0] > l0[1] > l0[2], l0


def test_model_axis_rule_of_thumb():
  assert sae_model_axis(8, [16_384]) == 1
  assert sae_model_axis(8, [131_072]) == 8
  assert sae_model_axis(8, [32_768, 65_536]) == 4
  assert sae_model_axis(6, [131_072]) == 2


def test_bad_sweeps_are_clear_errors():
  with pytest.raises(ValueError, match="l1_coefficients is empty"):
    stacked.make_groups([64], [])
  with pytest.raises(ValueError, match="widths"):
    stacked.make_groups([64, 64], [1e-3])
  with pytest.raises(ValueError, match=r"latents dimension 65 is not divisible by mesh axis 'model' of size 2"):
    build_step(0, np.zeros(16), stacked.make_groups([64, 65], [1e-3]), stacked.Recipe(), make_mesh(data=4, model=2), 64)
  with pytest.raises(ValueError, match="quadratic' needs target_l0"):
    stacked.Recipe(sparsity_loss="quadratic")
  with pytest.raises(ValueError, match="bandwidth must be > 0"):
    LossSpec(bandwidth=0)
  with pytest.raises(ValueError, match="sparsity_loss 'l1'"):
    dataclasses.replace(stacked.Recipe(), sparsity_loss="l1")


def test_latent_blocks_and_meshes_do_not_change_the_result():
  groups = stacked.make_groups([32, 64], [1e-3, 1e-1])
  recipe = stacked.Recipe(lr=1e-2, lr_warmup_steps=0, sparsity_warmup_steps=0, bandwidth=0.05)
  x = _data()
  results = []
  for mesh_shape, block in [((1, 1), 0), ((4, 2), 4), ((2, 4), 2)]:
    mesh = make_mesh(*mesh_shape)
    init, _, step_fn = build_step(0, np.zeros(16), groups, recipe, mesh, 128, block)
    state = init()
    for s in range(4):
      state, metrics = step_fn(state, x[128 * s : 128 * (s + 1)])
    results.append((jax.device_get(state), metrics))
  (whole, m_whole), *others = results
  for state, metrics in others:
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(state), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for k in ("l0", "mse", "grad_norm", "fvu", "dead_fraction"):
      np.testing.assert_allclose(m_whole[1][k], metrics[1][k], rtol=1e-4, err_msg=k)
  assert not np.allclose(whole["params"][0].W_enc, stacked.init_group(0, np.zeros(16), groups[0], recipe).W_enc)


def test_a_latent_block_that_does_not_divide_the_local_width_is_a_clear_error():
  with pytest.raises(ValueError, match="train.latent_block 5 does not divide the 32 latents each device holds"):
    build_step(0, np.zeros(16), stacked.make_groups([64], [1e-3]), stacked.Recipe(), make_mesh(data=4, model=2), 64, 5)
  with pytest.raises(ValueError, match="train.batch_size 30 is not divisible by the mesh's data axis \\(4\\)"):
    build_step(0, np.zeros(16), stacked.make_groups([64], [1e-3]), stacked.Recipe(), make_mesh(data=4, model=2), 30)
