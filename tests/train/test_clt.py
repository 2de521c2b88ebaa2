"""The cross-layer transcoder's step (train/clt.py) against `jax.grad` of the loss written out
plainly (a loop over every source → target pair) and optax's Adam, on a 4×2 mesh; the sparse
decoder against the dense one; a planted cross-layer map recovered."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scope_jax.parallel.dispatch import settle
from scope_jax.parallel.mesh import make_mesh
from scope_jax.sae.clt import CLT, init_clt
from scope_jax.sae.jumprelu import heaviside, jumprelu
from scope_jax.train import clt as clt_train
from scope_jax.train.stacked import Recipe

L, D, F, B = 3, 16, 32, 64


def reference_loss(p: CLT, x_lbd, y_lbd, lam, dead_lf, c_dead, bandwidth):
  """The CLT loss as the docstring of train/clt.py writes it, pair by pair."""
  pre = [x_lbd[s] @ p.W_enc[s] + p.b_enc[s] for s in range(L)]
  acts = [jumprelu(pre[s], p.threshold[s], bandwidth) for s in range(L)]
  loss = 0.0
  for t in range(L):
    yhat = p.b_dec[t] + sum(acts[s] @ p.W_dec[s][:, t - s, :] for s in range(t + 1))
    loss += jnp.mean(jnp.sum(jnp.square(y_lbd[t] - yhat), axis=-1))
  for s in range(L):
    norm_f = jnp.sqrt(jnp.sum(jnp.square(p.W_dec[s].reshape(F, -1)), axis=-1))
    loss += lam * jnp.mean(jnp.sum(norm_f * heaviside(pre[s], p.threshold[s], bandwidth), axis=-1))
    pull = jnp.where(dead_lf[s], jax.nn.relu(p.threshold[s] - pre[s]), 0.0)
    loss += c_dead * jnp.mean(jnp.sum(pull, axis=-1))
  return loss


def planted_rows(key, rows=B * 8):
  """Inputs whose every layer reads a shared sparse code; targets written from it, so a CLT fits them."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  code = jax.nn.relu(jax.random.normal(k1, (rows, 24)) - 1.0)
  noise = 0.05 * jax.random.normal(k3, (L, rows, D))
  x = jnp.einsum("bk,lkd->lbd", code, jax.random.normal(k2, (L, 24, D)) / 3) + noise
  y = jnp.einsum("bk,lkd->lbd", code, jax.random.normal(k4, (L, 24, D)) / 3)
  return np.asarray(x), np.asarray(y)


def _sweep(capacity=0, **recipe):
  fields = dict(
    lr=3e-3,
    lr_warmup_steps=0,
    sparsity_warmup_steps=0,
    bandwidth=0.05,
    init_threshold=0.05,
    dead_window_steps=1,
    dead_latent_loss=0.1,
    adam_b2=0.99,
  )
  return clt_train.CLTSweep(L, F, ((3e-3, 0), (1e-2, 1)), Recipe(**(fields | recipe)), B, 10, capacity)


def run_steps(sweep, mesh, x_lbd, y_lbd, steps):
  init, _ = clt_train.initializer(sweep, mesh, y_lbd.mean(axis=1), D)
  step = clt_train.make_step(sweep, mesh)
  state, stats = init(), []
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  for s in range(steps):
    rows = slice(s * B, (s + 1) * B)
    xb, yb = (jax.device_put(np.swapaxes(a[:, rows], 0, 1), sharding) for a in (x_lbd, y_lbd))
    state, st = step(state, xb, yb)
    settle(state, mesh)
    stats.append(jax.tree.map(np.asarray, st))
  return state, stats


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(data=4, model=2)


@pytest.mark.parametrize("capacity", [0, F, 10], ids=["dense", "sparse", "sparse-overflowing"])
def test_step_matches_jax_grad_and_optax(mesh, capacity):
  x, y = planted_rows(jax.random.key(0))
  sweep = _sweep(capacity, clip_grad_norm=0.5)
  steps = 3
  state, stats = run_steps(sweep, mesh, x, y, steps)
  for member in range(len(sweep.members)):
    want = _reference_with_dead(sweep, member, x, y, steps, clip=0.5)
    got = jax.tree.map(lambda a, m=member: np.asarray(a)[m], state["params"])
    for name in ("W_enc", "b_enc", "threshold"):
      np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=2e-4, atol=2e-6, err_msg=name)
    for s in range(L):
      np.testing.assert_allclose(got.W_dec[s], want.W_dec[s], rtol=2e-4, atol=2e-6, err_msg=f"W_dec {s}")
    np.testing.assert_allclose(got.b_dec, want.b_dec, rtol=2e-4, atol=2e-6)
  sparse = np.asarray([st["sparse"] for st in stats])
  if capacity == F:
    assert (sparse == 1).all()
  elif capacity == 10:  # ~14 of 32 latents fire per layer: some devices' layers overflow, others fit
    assert ((sparse > 0) & (sparse < 1)).all()
  else:
    assert (sparse == 0).all()


def _reference_with_dead(sweep, member, x_lbd, y_lbd, steps, clip):
  """`steps` updates by jax.grad + optax Adam, tracking which latents are dead as the trainer does
  (fired anywhere in the step's batch, before its update)."""
  lam, seed = sweep.members[member]
  r = sweep.recipe
  p = init_clt(jax.random.key(seed), L, D, D, F, r.init_threshold, y_lbd.mean(axis=1))
  tx = optax.chain(optax.clip_by_global_norm(clip), optax.adam(r.lr, b1=r.adam_b1, b2=r.adam_b2, eps=r.adam_eps))
  opt = tx.init(p)
  since = jnp.zeros((L, F), jnp.int32)
  for s in range(steps):
    x, y = x_lbd[:, s * B : (s + 1) * B], y_lbd[:, s * B : (s + 1) * B]
    dead = since >= r.dead_window_steps
    fired = jnp.stack([jnp.any(x[i] @ p.W_enc[i] + p.b_enc[i] > p.threshold[i], axis=0) for i in range(L)])
    g = jax.grad(reference_loss)(p, x, y, lam, dead, r.dead_latent_loss, r.bandwidth)
    updates, opt = tx.update(g, opt, p)
    p = optax.apply_updates(p, updates)
    p = p.replace(threshold=jnp.maximum(p.threshold, 0.0))
    since = jnp.where(fired, 0, since + 1)
  return p


def test_planted_cross_layer_map_recovered(mesh):
  """Features read at one layer and written into that layer's and every later layer's target (a
  direction per target): each is found as one latent of its layer whose decoder, concatenated over
  the layers it writes to, has cosine ≥ 0.9 with the planted one."""
  layers, d, n, width, rows, steps = 3, 24, 8, 32, 256, 1500
  rng = np.random.default_rng(0)
  enc = rng.normal(size=(layers, n, d))
  enc /= np.linalg.norm(enc, axis=-1, keepdims=True)
  dec = [rng.normal(size=(n, layers - s, d)) / np.sqrt(d) for s in range(layers)]
  code = (rng.random((layers, rows * steps, n)) < 0.15) * rng.uniform(0.5, 1.5, (layers, rows * steps, n))
  x = np.einsum("lbn,lnd->lbd", code, enc) + 0.01 * rng.normal(size=(layers, rows * steps, d))
  y = np.zeros_like(x)
  for s in range(layers):
    y[s:] += np.einsum("bn,ntd->tbd", code[s], dec[s])
  recipe = Recipe(
    lr=3e-3,
    lr_warmup_steps=50,
    sparsity_warmup_steps=200,
    bandwidth=0.05,
    init_threshold=0.05,
    dead_window_steps=50,
    dead_latent_loss=0.1,
    adam_b2=0.99,
  )
  sweep = clt_train.CLTSweep(layers, width, ((3e-2, 0),), recipe, rows, steps)
  init, _ = clt_train.initializer(sweep, mesh, y.mean(axis=1), d)
  step = clt_train.make_step(sweep, mesh)
  state = init()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  for s in range(steps):
    batch = slice(s * rows, (s + 1) * rows)
    xb, yb = (jax.device_put(np.swapaxes(a[:, batch], 0, 1).astype(np.float32), sharding) for a in (x, y))
    state, _ = step(state, xb, yb)
    settle(state, mesh)
  for s in range(layers):
    learned = np.asarray(state["params"].W_dec[s][0]).reshape(width, -1)
    planted = dec[s].reshape(n, -1)
    cos = (planted / np.linalg.norm(planted, axis=-1, keepdims=True)) @ (
      learned / np.linalg.norm(learned, axis=-1, keepdims=True)
    ).T
    best = cos.max(axis=1)
    assert (best >= 0.9).mean() >= 0.9, f"layer {s}: best cosines {np.round(best, 3)}"
