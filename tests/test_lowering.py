"""Every jitted program the project runs lowers for TPU and CUDA (`jax.export`, on a 4×2 mesh of
fake CPU devices), with no host callback in the module: a job launched on a pod or a GPU host
cannot fail at compile time on a program only the CPU was ever asked to build."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import scope_jax as sj
from scope_jax.browse import features
from scope_jax.core.kinds import kind_named
from scope_jax.data.batch import Batch
from scope_jax.eval import statistics
from scope_jax.export import exporter
from scope_jax.models.sites import parse_site
from scope_jax.parallel.mesh import make_mesh
from scope_jax.train import run, stacked
from tests.helpers import tiny_gemma3
from tests.sae.test_io import random_sae

PLATFORMS = ("tpu", "cuda")
D = 16


def _lowers(fn, *args) -> str:
  exported = jax.export.export(fn, platforms=PLATFORMS)(*args)
  module = exported.mlir_module()
  assert exported.platforms == PLATFORMS
  assert "callback" not in module  # no host round trip (xla_python_*_callback, pure_callback, debug prints)
  return module


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


@pytest.mark.parametrize(
  "kind,prefixes,capacity,precision",
  [
    ("sae", (), 0, "float32"),
    ("sae", (), 16, "float32"),
    ("sae", (), 0, "bfloat16"),
    ("sae", (), 16, "bfloat16"),
    ("sae", (32,), 0, "float32"),
    ("sae", (32,), 16, "float32"),
    ("transcoder", (), 0, "float32"),
    ("transcoder", (), 16, "float32"),
    ("skip_transcoder", (), 0, "float32"),
    ("skip_transcoder", (), 16, "float32"),
  ],
  ids=[
    "sae",
    "sae-sparse",
    "sae-bf16",
    "sae-sparse-bf16",
    "matryoshka",
    "matryoshka-sparse",
    "tc",
    "tc-sparse",
    "skip",
    "skip-sparse",
  ],
)
def test_every_training_step_lowers_for_tpu_and_cuda(kind, prefixes, capacity, precision):
  mesh, batch = make_mesh(4, 2), 128
  groups = stacked.make_groups([64, 128], [1e-3, 1e-2], prefixes=prefixes)
  recipe = stacked.Recipe(clip_grad_norm=1.0, dead_latent_loss=0.1, frequency_scale=0.1 if capacity else 0.0)
  kind = kind_named(kind)
  sweep = stacked.Sweep(tuple(groups), recipe, batch, kind, precision=precision)
  rows = jax.ShapeDtypeStruct((batch, D), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
  for free in (None, 80 * 10**9):  # the cache rule and the memory rule (whole width, kept pre-activations)
    built = run.build(sweep, mesh, np.zeros(D), D, free)
    state = stacked.abstract_state(built.init, built.shardings)
    module = _lowers(built.make_step((capacity,) * 2), state, Batch(rows, rows if kind.transcoder else None))
    assert ("bf16" in module) == (precision == "bfloat16")


@pytest.mark.parametrize("capacity", [0, 48], ids=["dense", "sparse"])
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_the_topk_and_batchtopk_steps_lower_for_tpu_and_cuda(activation, capacity):
  mesh, batch = make_mesh(4, 2), 128
  groups = stacked.make_groups([64, 128], [4, 8], activation=activation)
  sweep = stacked.Sweep(tuple(groups), stacked.Recipe(clip_grad_norm=1.0), batch)
  rows = jax.ShapeDtypeStruct((batch, D), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
  built = run.build(sweep, mesh, np.zeros(D), D)
  state = stacked.abstract_state(built.init, built.shardings)
  _lowers(built.make_step((capacity,) * 2), state, Batch(rows))


@pytest.fixture(scope="module")
def sharded_lm(tmp_path_factory):
  path = tmp_path_factory.mktemp("gemma3")
  tiny_gemma3(path)
  return sj.load_model(path, mesh=make_mesh(4, 2), precision="bfloat16")


def test_the_model_forward_and_its_split_halves_lower_for_tpu_and_cuda(sharded_lm):
  lm = sharded_lm
  tokens = jax.ShapeDtypeStruct((8, 12), jnp.int32, sharding=lm._batch_sharding)
  state = _abstract(lm._state, jax.tree.map(lambda a: a.sharding, lm._state))
  site = parse_site("res.2", lm.config)
  capture = (parse_site("mlp_in.1", lm.config), site)
  _lowers(lm._jitted, state, tokens, lm._graphdef, capture, (), True, jnp.float32)
  _lowers(lm._jitted_losses, state, tokens, lm._graphdef, ())
  resid = jax.ShapeDtypeStruct((8, 12, lm.config.d_model), lm.dtype, sharding=lm._batch_sharding)
  _lowers(lm.jitted_to_site, state, tokens, lm._graphdef, site)
  _lowers(lm.jitted_from_site, state, tokens, resid, resid, lm._graphdef, site)


def test_the_eval_engine_the_browser_encoder_and_the_export_measure_lower_for_tpu_and_cuda():
  sae = random_sae(D, 64, seed=1)
  act = jnp.zeros((8, 12, D), jnp.float32)
  keep = jnp.ones((8, 12), bool)
  _lowers(statistics.sae_batch, sae, act, keep)
  _lowers(statistics.sae_batch, sae, act, keep, act)  # a transcoder's splice reads another site
  _lowers(statistics.site_sums, act, keep)
  _lowers(features._encode, sae, jnp.zeros((256, D), jnp.float32))
  groups = (*stacked.make_groups([64], [1e-3]), *stacked.make_groups([64], [8], activation="topk"))
  params = tuple(stacked.init_group(0, np.zeros(D), g, stacked.Recipe()) for g in groups)
  ks = (jnp.zeros((1,), jnp.int32), jnp.full((1,), 8, jnp.int32))
  _lowers(exporter._fire_counts, params, Batch(jnp.zeros((128, D), jnp.float32)), False, (False, True), ks)
