"""Transcoders, skip-transcoders, Matryoshka SAEs and the frequency penalty: each loss's steps
against optax's Adam on `jax.grad` through the public custom-VJP functions, planted recoveries,
a stacked sweep against its members trained alone, files read by SAELens's own classes and
loader, `train.init_from`, and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from scope_jax.config import default_config, validate
from scope_jax.data import ArraySource
from scope_jax.data.source import PairedSource
from scope_jax.parallel.mesh import make_mesh
from scope_jax.sae import heaviside, jumprelu, load_sae, save_sae, training_pre, unstack
from scope_jax.sae.loss import LossSpec
from scope_jax.sae.model import SAE, SAEInfo, fold, init_transcoder, unfold
from scope_jax.train import stacked, train
from scope_jax.train.optim import project_rows
from scope_jax.train.params import TrainParams
from tests.train.steps import build_step

D_IN, D_OUT = 12, 16


def random_transcoder(m=32, skip=False, seed=0) -> SAE:
  rng = np.random.default_rng(seed)
  sae = init_transcoder(jax.random.key(seed), D_IN, D_OUT, m, 0.1, jnp.asarray(rng.normal(0, 0.3, D_OUT)), skip)
  sae = sae.replace(
    b_enc=jnp.asarray(rng.normal(0, 0.3, m), jnp.float32),
    threshold=jnp.asarray(rng.uniform(0.05, 0.4, m), jnp.float32),
  )
  if skip:
    sae = sae.replace(W_skip=jnp.asarray(rng.normal(0, 0.2, (D_IN, D_OUT)), jnp.float32))
  return sae


def _paired_data(n, seed=0):
  """(x [n, D_IN], y [n, D_OUT]): y a noisy nonlinear map of x, so no model fits it exactly."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D_IN)).astype(np.float32)
  y = np.maximum(x @ rng.normal(size=(D_IN, D_OUT)), 0) + 0.1 * rng.normal(size=(n, D_OUT))
  return x, y.astype(np.float32)


def _composed_loss(sae: SAE, x, y, lam, spec: LossSpec):
  """The loss of sae/loss.py written with the public `jumprelu`/`step`, for jax.grad."""
  pre = training_pre(sae, x, spec.transcoder)
  f = jumprelu(pre, sae.threshold, spec.bandwidth)
  base = sae.b_dec + sae.skip(x)
  ends = spec.prefixes or (sae.width,)
  mse = sum(jnp.mean(jnp.sum(jnp.square(y - (f[:, :m] @ sae.W_dec[:m] + base)), -1)) for m in ends)
  h = heaviside(pre, sae.threshold, spec.bandwidth)
  loss = mse + lam * jnp.mean(spec.penalty(jnp.sum(h, -1)))
  if spec.frequency_scale:
    loss += lam * jnp.sum(jnp.square(jnp.mean(h, 0))) / spec.frequency_scale
  return loss


CASES = {
  "transcoder": dict(kind="transcoder"),
  "skip_transcoder": dict(kind="skip_transcoder"),
  "matryoshka": dict(kind="sae", prefixes=(8, 16)),
  "matryoshka_transcoder": dict(kind="skip_transcoder", prefixes=(8, 24)),
  "frequency": dict(kind="sae", frequency_scale=0.05),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("capacity", [0, 32], ids=["dense", "sparse"])
def test_steps_follow_optax_adam_on_jax_grad_of_each_new_loss(case, capacity):
  """Four real steps (blocked over latents, sharded 4×2; dense, or sparse with room for every
  slot) against optax's Adam (β1 = 0) fed `jax.grad` of the loss composed from the public
  functions, with the decoder projection and renormalization around it."""
  kind, prefixes, freq = CASES[case]["kind"], CASES[case].get("prefixes", ()), CASES[case].get("frequency_scale", 0.0)
  m, lam, batch = 32, 0.05, 64
  recipe = stacked.Recipe(lr=3e-3, lr_warmup_steps=0, sparsity_warmup_steps=0, bandwidth=0.05, frequency_scale=freq)
  groups = stacked.make_groups([m], [lam], prefixes=prefixes)
  d_in = D_IN if kind != "sae" else D_OUT
  mean = np.zeros(d_in + D_OUT if kind != "sae" else D_OUT)
  init, shardings, step_fn = build_step(
    0, mean, groups, recipe, make_mesh(4, 2), batch, 4, 0, (capacity,), kind=kind, d_in=d_in
  )
  if kind == "sae":
    from tests.sae.test_io import random_sae

    sae = random_sae(D_OUT, m, seed=3)
  else:
    sae = random_transcoder(m, skip=kind == "skip_transcoder", seed=3)
  state = init() | {
    "params": jax.device_put((TrainParams.from_sae(jax.tree.map(lambda a: a[None], sae)),), shardings["params"])
  }
  spec = recipe.group_loss(groups[0], kind)
  opt = optax.chain(
    optax.scale_by_rms(decay=recipe.adam_b2, eps=recipe.adam_eps, eps_in_sqrt=False, bias_correction=True),
    optax.scale(-recipe.lr),
  )
  opt_state, ref = opt.init(sae), sae
  x_all, y_all = _paired_data(4 * batch, seed=4)
  for s in range(4):
    x, y = x_all[s * batch : (s + 1) * batch], y_all[s * batch : (s + 1) * batch]
    if kind == "sae":
      x = y
    state, stats = step_fn(state, np.concatenate([x, y], 1) if kind != "sae" else y)
    assert stats[0]["sparse"][0] == (capacity > 0)
    loss, g = jax.value_and_grad(_composed_loss)(ref, x, y, lam, spec)
    np.testing.assert_allclose(stats[0]["loss"][0], loss, rtol=1e-4)
    np.testing.assert_allclose(stats[0]["grad_norm"][0], optax.global_norm(g), rtol=1e-4)
    updates, opt_state = opt.update(g.replace(W_dec=project_rows(g.W_dec, ref.W_dec)), opt_state)
    ref = optax.apply_updates(ref, updates)
    ref = ref.replace(
      W_dec=ref.W_dec / jnp.linalg.norm(ref.W_dec, axis=-1, keepdims=True), threshold=jnp.maximum(ref.threshold, 0.0)
    )
    got = unstack(jax.device_get(state["params"][0]).to_sae())[0]
    for k in ref.names:
      np.testing.assert_allclose(getattr(got, k), getattr(ref, k), rtol=1e-4, atol=2e-6, err_msg=f"step {s} {k}")
  assert not np.allclose(ref.threshold, sae.threshold)
  if freq:
    assert stats[0]["frequency_loss"][0] > 0


def _planted_map(n=30_000, k=48, seed=1, dense=0.02):
  """(input directions [k, D_IN], output directions [k, D_OUT], affine A [D_IN, D_OUT], x, y): each row
  holds ~3 of k features; feature i writes output direction i; y also carries x @ A."""
  rng = np.random.default_rng(seed)
  d_in, d_out = 48, 40
  u = rng.normal(size=(k, d_in))
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  v = rng.normal(size=(k, d_out))
  v /= np.linalg.norm(v, axis=1, keepdims=True)
  a = rng.uniform(1, 3, (n, k)) * (rng.random((n, k)) < 3 / k)
  x = a @ u + dense * rng.normal(size=(n, d_in))
  affine = rng.normal(0, 0.3, (d_in, d_out))
  return u, v, a, x.astype(np.float32), (a @ v).astype(np.float32), affine


def _train_transcoders(tmp_path, kind, x, y, steps, widths=(96,), lambdas=(1e-2, 3e-2, 1e-1), seed=0, bandwidth=0.05):
  mesh = make_mesh(devices=jax.devices()[:2], data=2, model=1)
  c = default_config()
  c.kind, c.site, c.sites = kind, "mlp_in.0", ("mlp_in.0", "mlp.0")
  c.sweep.widths, c.sweep.l1_coefficients = widths, lambdas
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 256, steps, 100, 10**6
  c.train.step = "dense"
  c.recipe.lr, c.recipe.lr_warmup_steps, c.recipe.sparsity_warmup_steps = 3e-3, 50, 200
  c.recipe.bandwidth = bandwidth
  source = PairedSource(ArraySource(x, 256, mesh, seed), ArraySource(y, 256, mesh, seed))
  return train(c, tmp_path, source, progress=False)


def test_a_transcoder_recovers_a_planted_sparse_map_and_the_skip_its_affine_part(tmp_path):
  _, v, a, x, y, _ = _planted_map()
  state = _train_transcoders(tmp_path / "plain", "transcoder", x, y, 2500, bandwidth=0.001)
  recovered, rows = [], slice(0, 8192)
  x_rows = x[rows] / np.sqrt(np.mean(np.sum(x**2, 1)))  # the source's "raw" normalization
  for sae in unstack(jax.device_get(state["params"][0]).to_sae()):
    f = np.asarray(jumprelu(training_pre(sae, x_rows, True), sae.threshold, 0.001))  # [rows, M]
    dec = np.asarray(sae.W_dec)  # unit rows
    # planted pair i (input feature i -> output direction v_i) is recovered when one latent writes
    # v_i (cosine >= 0.9) and its activation follows feature i's magnitude (correlation >= 0.9)
    pair = []
    for i in range(len(v)):
      best = int(np.argmax(dec @ v[i]))
      follows = np.corrcoef(f[:, best], a[rows, i])[0, 1] if f[:, best].std() > 0 else 0.0
      pair.append(dec[best] @ v[i] >= 0.9 and follows >= 0.9)
    recovered.append(float(np.mean(pair)))
  assert max(recovered) >= 0.9, recovered

  # x's dense part no sparse latent can stand for, so only the skip can carry its share of y
  _, _, _, x, y_sparse, affine = _planted_map(seed=2, dense=0.5)
  y = y_sparse + x @ affine
  state = _train_transcoders(tmp_path / "skip", "skip_transcoder", x, y.astype(np.float32), 2500, lambdas=(1e-2,))
  W_skip = np.asarray(state["params"][0].W_skip)[0]
  cos = np.sum(W_skip * affine) / (np.linalg.norm(W_skip) * np.linalg.norm(affine))
  assert cos >= 0.95, cos


def test_a_stacked_sweep_of_transcoders_equals_each_trained_alone(tmp_path):
  x, y = _paired_data(4096, seed=5)
  widths, lambdas = (32, 64), (1e-3, 3e-2)
  together = _train_transcoders(tmp_path / "sweep", "skip_transcoder", x, y, 25, widths, lambdas)
  for gi, width in enumerate(widths):
    for li, lam in enumerate(lambdas):
      alone = _train_transcoders(tmp_path / f"{width}-{lam}", "skip_transcoder", x, y, 25, (width,), (lam,))
      got, want = unstack(together["params"][gi].to_sae())[li], unstack(alone["params"][0].to_sae())[0]
      for k in got.names:
        np.testing.assert_allclose(
          getattr(got, k), getattr(want, k), rtol=2e-4, atol=2e-5, err_msg=f"{width} {lam} {k}"
        )


def test_a_matryoshka_prefix_reconstructs_better_than_the_same_prefix_of_a_plain_sae(tmp_path):
  from tests.train.test_step import planted_dictionary

  _, x = planted_dictionary(d=32, k=96, n=20_000)
  x = x.astype(np.float32)
  mesh = make_mesh(devices=jax.devices()[:1])
  errors = {}
  for name, prefixes in (("plain", ()), ("matryoshka", (16, 48))):
    c = default_config()
    c.sweep.widths, c.sweep.l1_coefficients, c.sweep.prefixes = (96,), (1e-2,), prefixes
    c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 512, 800, 100, 10**6
    c.train.step = "dense"
    c.recipe.lr, c.recipe.lr_warmup_steps, c.recipe.sparsity_warmup_steps = 3e-3, 50, 200
    state = train(c, tmp_path / name, ArraySource(x, 512, mesh, seed=0, normalize=None), progress=False)
    sae = unstack(jax.device_get(state["params"][0]).to_sae())[0]
    f = np.asarray(jumprelu(training_pre(sae, x[:4096]), sae.threshold, 0.001))
    recon = f[:, :16] @ np.asarray(sae.W_dec)[:16] + np.asarray(sae.b_dec)
    errors[name] = float(np.mean(np.sum((x[:4096] - recon) ** 2, 1)) / np.mean(np.sum((x - x.mean(0)) ** 2, 1)))
  assert errors["matryoshka"] < 0.8 * errors["plain"], errors


# ---------------------------------------------------------------- files


def _released_transcoder(skip: bool) -> SAE:
  sae = fold(random_transcoder(40, skip=skip, seed=7), 3.0, 5.0)
  return sae.replace(info=SAEInfo(site="mlp_in.3", target_site="mlp.3", model="google/gemma-3-270m"))


@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip_transcoder"])
def test_saelens_loads_our_transcoder_exports_with_its_own_classes(tmp_path, skip):
  from sae_lens import SAE as LensSAE
  from sae_lens.saes.transcoder import JumpReLUSkipTranscoder, JumpReLUTranscoder

  sae = _released_transcoder(skip)
  path = save_sae(sae, tmp_path / "lens", format="saelens")
  lens = LensSAE.load_from_disk(str(path))
  assert type(lens) is (JumpReLUSkipTranscoder if skip else JumpReLUTranscoder)
  x = np.random.default_rng(0).normal(0, 3, (64, D_IN)).astype(np.float32)
  with torch.no_grad():
    theirs = lens(torch.tensor(x)).numpy()
  np.testing.assert_allclose(theirs, np.asarray(sae(x)), rtol=1e-5, atol=1e-5)
  back = load_sae(path)
  assert back.info.site == "mlp_in.3" and back.info.target_site == "mlp.3"
  for k in sae.names:
    np.testing.assert_array_equal(getattr(back, k), getattr(sae, k))


@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip_transcoder"])
def test_gemma_scope_2_files_round_trip_and_match_saelens_gemma_3_loader(tmp_path, monkeypatch, kind):
  """SAELens's own Gemma Scope 2 loader reads our folder: its Hugging Face downloads are pointed
  at the local files (nothing else of it is replaced)."""
  from sae_lens.loading import pretrained_sae_loaders as loaders
  from safetensors.numpy import load_file

  if kind == "sae":
    from tests.sae.test_io import random_sae

    sae = fold(random_sae(24, 40, seed=2), 4.0).replace(info=SAEInfo(site="res.5", model="google/gemma-3-270m"))
    folder = "resid_post/layer_5_width_40_l0_10"
  else:
    sae = _released_transcoder(kind == "skip_transcoder")
    folder = "transcoder/layer_3_width_40_l0_10" + ("_affine" if kind == "skip_transcoder" else "")
  root = tmp_path / "gemma-scope-2-270m-pt"
  path = save_sae(sae, root / folder, format="gemma-scope-2")
  back = load_sae(path)
  assert (back.info.site, back.info.target_site) == (sae.info.site, sae.info.target_site)
  for k in sae.names:
    np.testing.assert_array_equal(getattr(back, k), getattr(sae, k))

  local = lambda repo_id, filename=None, subfolder=None, **_: str(
    root / (f"{subfolder}/{filename}" if subfolder else filename)
  )
  monkeypatch.setattr(loaders, "hf_hub_download", local)
  shapes = lambda repo_id, filename, **_: {k: list(v.shape) for k, v in load_file(root / filename).items()}
  monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)
  cfg, state, _ = loaders.gemma_3_sae_huggingface_loader("google/gemma-scope-2-270m-pt", folder)
  expected = {"sae": "jumprelu", "transcoder": "jumprelu_transcoder", "skip_transcoder": "jumprelu_skip_transcoder"}
  assert cfg["architecture"] == expected[kind]
  for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
    np.testing.assert_array_equal(state[k].numpy(), getattr(sae, k))
  if kind == "skip_transcoder":
    np.testing.assert_array_equal(state["W_skip"].numpy(), np.asarray(sae.W_skip).T)
  if kind != "sae":
    assert cfg["hf_hook_name_out"] == "model.layers.3.post_feedforward_layernorm.output"


def test_unfold_inverts_fold_for_saes_and_transcoders():
  from tests.sae.test_io import random_sae

  for sae, scales in ((random_sae(24, 40), (3.0,)), (random_transcoder(40, skip=True), (3.0, 5.0))):
    back = unfold(fold(sae, *scales), *scales)
    for k in sae.names:
      np.testing.assert_allclose(getattr(back, k), getattr(sae, k), rtol=2e-6, atol=2e-6, err_msg=k)
  # a release whose decoder rows are not unit norm comes back with unit rows and the same function
  sae = random_sae(24, 40)
  scaled = sae.replace(W_dec=sae.W_dec * 2.0, W_enc=sae.W_enc / 2.0, b_enc=sae.b_enc / 2, threshold=sae.threshold / 2)
  back = unfold(fold(scaled, 3.0), 3.0)
  np.testing.assert_allclose(np.linalg.norm(back.W_dec, axis=-1), 1, atol=1e-6)
  x = np.random.default_rng(0).normal(size=(32, 24)).astype(np.float32)
  np.testing.assert_allclose(fold(back, 3.0)(x * 3.0), fold(scaled, 3.0)(x * 3.0), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- init_from and bad input


def test_init_from_starts_from_the_runs_own_export(tmp_path):
  """A run's export, read back by `train.init_from` on the same store, gives back the parameters
  of the checkpoint it was exported from."""
  from scope_jax.export import export
  from scope_jax.train.checkpoints import restore_or_init
  from scope_jax.train.run import open_run

  x, y = _paired_data(4096, seed=6)
  mesh = make_mesh(devices=jax.devices()[:2], data=2, model=1)
  source = lambda: PairedSource(
    ArraySource(x, 256, mesh, 0, normalize="centred"), ArraySource(y, 256, mesh, 0, normalize="centred")
  )
  c = default_config()
  c.kind, c.site, c.sites = "skip_transcoder", "mlp_in.0", ("mlp_in.0", "mlp.0")
  c.sweep.widths, c.sweep.l1_coefficients = (32,), (1e-2,)
  c.train.batch_size, c.train.steps, c.train.checkpoint_every, c.train.step = 256, 30, 10**6, "dense"
  c.recipe.lr, c.recipe.lr_warmup_steps, c.recipe.sparsity_warmup_steps = 3e-3, 5, 10
  c.export.batches = 2
  trained = train(c, tmp_path / "run", source(), progress=False)
  entries = export(c, tmp_path / "run", source(), progress=False)
  for fmt in ("gemma_scope_2", "saelens"):
    c2 = c.copy_and_resolve_references()
    c2.train.init_from = entries[0].files[fmt]
    run = open_run(c2, tmp_path / f"again-{fmt}", source())
    try:
      state = restore_or_init(run.checkpoints, run.identity, run.built.init, run.built.shardings)
    finally:
      run.close()
    got, want = state["params"][0].to_sae(), trained["params"][0].to_sae()
    for k in want.names:
      np.testing.assert_allclose(getattr(got, k), getattr(want, k), rtol=1e-5, atol=1e-6, err_msg=f"{fmt} {k}")
    assert int(state["step"]) == 0

  c3 = c.copy_and_resolve_references()
  c3.sweep.widths, c3.train.init_from = (64,), entries[0].files["saelens"]
  with pytest.raises(ValueError, match="width 32 .* this sweep trains a skip_transcoder of width \\[64\\]"):
    open_run(c3, tmp_path / "wrong-width", source())
  c4 = c.copy_and_resolve_references()
  c4.kind, c4.train.init_from = "transcoder", entries[0].files["saelens"]
  with pytest.raises(ValueError, match="a skip_transcoder of width 32"):
    open_run(c4, tmp_path / "wrong-kind", source())
  released = load_sae(entries[0].files["saelens"])
  narrower_input = released.replace(W_enc=released.W_enc[:-1], W_skip=released.W_skip[:-1])
  c5 = c.copy_and_resolve_references()
  c5.train.init_from = str(save_sae(narrower_input, tmp_path / "narrower", format="saelens"))
  d_in = x.shape[1]
  with pytest.raises(ValueError, match=f"width 32 and input width {d_in - 1}; this sweep trains .* input width {d_in}"):
    open_run(c5, tmp_path / "wrong-input", source())


def test_bad_transcoder_and_matryoshka_configs_are_clear_errors():
  c = default_config()
  c.kind, c.site, c.sites = "transcoder", "mlp_in.3", ("mlp_in.3", "mlp.4")
  c.target_site = "mlp.4"
  with pytest.raises(ValueError, match="target_site = 'mlp.4': expected a site of layer 3"):
    validate(c)
  c.target_site, c.sites = "mlp.3", ("mlp_in.3",)
  with pytest.raises(ValueError, match=r"target_site = 'mlp.3': expected one of sites \('mlp_in.3',\)"):
    validate(c)
  c.site, c.target_site = "res.3", None
  with pytest.raises(ValueError, match="it defaults to mlp.L only for site mlp_in.L"):
    validate(c)
  c = default_config()
  c.sweep.widths, c.sweep.prefixes = (64, 128), (32, 16)
  with pytest.raises(ValueError, match="sweep.prefixes .* strictly increasing"):
    validate(c)
  c.sweep.prefixes = (32, 100)
  with pytest.raises(ValueError, match="sweep.prefixes .* at most the narrowest width \\(64\\)"):
    validate(c)
  with pytest.raises(ValueError, match="prefix size 100 exceeds the SAE width 64"):
    stacked.make_groups([64, 128], [1e-3], prefixes=[32, 100])


def test_transcoder_sources_must_pair_rows(tmp_path):
  mesh = make_mesh(devices=jax.devices()[:1])
  x, y = _paired_data(1024)
  with pytest.raises(ValueError, match="must come from one store read alike"):
    PairedSource(ArraySource(x, 64, mesh, seed=0), ArraySource(y, 64, mesh, seed=1))
  c = default_config()
  c.kind, c.site, c.data.path = "transcoder", "mlp_in.0", str(tmp_path / "x.npy")
  np.save(tmp_path / "x.npy", x)
  from scope_jax.train.run import source_from_config

  with pytest.raises(ValueError, match="a transcoder trains on a store holding both its sites, not a .npy"):
    source_from_config(c, tmp_path, mesh)
