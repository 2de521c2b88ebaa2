"""The step sized for the device it runs on: the memory rule's tiling (whole-width blocks, kept
pre-activations) gives the blocked step's result, and the matmul precision is a choice."""

import jax
import numpy as np
import pytest

from scope_jax.parallel.mesh import make_mesh
from scope_jax.train import stacked
from scope_jax.train.tiling import DENSE_TILE, HOST_GRADIENT_BYTES, SPARSE_TILE, choose_tiling, keeps_gradients
from tests.train.steps import build_step

GB = 10**9
RECIPE = stacked.Recipe(lr=1e-2, lr_warmup_steps=0, sparsity_warmup_steps=0, bandwidth=0.05, init_threshold=0.3)


def _data(rows=512, d=16, seed=0):
  rng = np.random.default_rng(seed)
  dictionary = rng.normal(0, 1, (64, d))
  codes = rng.exponential(1.0, (rows, 64)) * (rng.random((rows, 64)) < 0.1)
  return (codes @ dictionary + 0.1 * rng.normal(0, 1, (rows, d))).astype(np.float32)


def test_the_memory_rule_takes_whole_width_blocks_and_keeps_pre_activations_where_they_fit():
  # Gemma Scope's shapes on one H100: B 4,096, a 131K-wide SAE
  cache = choose_tiling(131_072, 4_096, sparse=False)
  assert (cache.block, cache.keep_pre, cache.rule) == (DENSE_TILE // 4_096, False, "cache")
  assert choose_tiling(131_072, 4_096, sparse=True).block == SPARSE_TILE // 4_096
  memory = choose_tiling(131_072, 4_096, sparse=False, free_bytes=70 * GB)
  assert (memory.block, memory.keep_pre, memory.rule) == (131_072, True, "memory")
  assert choose_tiling(131_072, 4_096, sparse=True, free_bytes=70 * GB).block == 131_072
  # 8 floats per row and latent of a block, pre-activations 1 more over the whole width, in half the free memory
  tight = choose_tiling(131_072, 4_096, sparse=False, free_bytes=8 * GB)
  assert tight.block == 16_384 and not tight.keep_pre  # the next divisor's 4.3 GB would not fit 4 GB
  assert 4 * 4_096 * 8 * tight.block <= 4 * GB < 4 * 4_096 * 8 * 2 * tight.block
  # blocks never straddle a Matryoshka prefix, and a fixed block is kept on every backend
  assert choose_tiling(3_072, 4_096, sparse=False, prefixes=(1_024,), free_bytes=70 * GB).block == 1_024
  fixed = choose_tiling(131_072, 4_096, sparse=False, requested=512, free_bytes=70 * GB)
  assert (fixed.block, fixed.keep_pre, fixed.rule) == (512, False, "fixed")
  with pytest.raises(ValueError, match="train.latent_block 5 does not divide the 64 latents each device holds"):
    choose_tiling(64, 128, sparse=False, requested=5, free_bytes=70 * GB)


def test_clipping_keeps_one_saes_gradient_where_the_rule_leaves_room_for_it():
  # a 131K × 2,304 SAE's gradient is 2.4 GB: it fits what the memory rule leaves of 35 GB, not of 4 GB
  memory = choose_tiling(131_072, 4_096, sparse=False, free_bytes=70 * GB)
  assert keeps_gradients(memory.gradient_bytes, 1.0, 131_072, 2_304, 2_304)
  assert not keeps_gradients(memory.gradient_bytes, 0.0, 131_072, 2_304, 2_304)  # no clipping, nothing to keep
  tight = choose_tiling(131_072, 4_096, sparse=False, free_bytes=8 * GB)
  assert not keeps_gradients(tight.gradient_bytes, 1.0, 131_072, 2_304, 2_304)
  cache = choose_tiling(2_048, 1_024, sparse=False)  # the local run's: 10 MB kept on the host
  assert cache.gradient_bytes == HOST_GRADIENT_BYTES and keeps_gradients(cache.gradient_bytes, 1.0, 2_048, 640, 640)


@pytest.mark.parametrize("capacities", [(0, 0), (32, 64)], ids=["dense", "sparse"])
def test_the_accelerator_tiling_gives_the_blocked_steps_parameters_and_adam_state(capacities):
  """On a 4×2 mesh: 4 blocks of 4 latents per device with the encoder recomputed, against the memory
  rule of an 80 GB device (one block of the local width, pre-activations kept by the dense step)."""
  groups = stacked.make_groups([32, 64], [1e-3, 3e-2])
  mesh, x = make_mesh(4, 2), _data()
  states, printed = [], []
  for block, free in ((4, None), (0, 80 * GB)):
    init, _, step_fn = build_step(0, np.zeros(16), groups, RECIPE, mesh, 128, block, 0, capacities, free_bytes=free)
    state = init()
    for s in range(4):
      state, metrics = step_fn(state, x[128 * s : 128 * (s + 1)])
    states.append(jax.device_get(state))
    printed.append((float(metrics[1]["latent_block"][0]), float(metrics[1]["keeps_pre"][0])))
  sparse = capacities[0] > 0
  assert printed == [(4, 0), (32, not sparse)]
  assert float(metrics[1]["sparse"][0]) == sparse  # the sparse step really ran
  blocked, whole = states
  for name, a, b in zip(
    [str(p) for p, _ in jax.tree_util.tree_leaves_with_path(blocked)], jax.tree.leaves(blocked), jax.tree.leaves(whole)
  ):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(1e-30, np.abs(a).max()), err_msg=name)


def _train(precision: str, steps: int = 6, patch=None):
  groups = stacked.make_groups([64], [1e-3])
  mesh, x = make_mesh(4, 2), _data()
  init, _, step_fn = build_step(0, np.zeros(16), groups, RECIPE, mesh, 128, 8, precision=precision)
  state = init()
  for s in range(steps):
    state, _ = step_fn(state, x[128 * (s % 4) : 128 * (s % 4 + 1)])
  return jax.device_get(state["params"][0])


def test_float32_precision_is_the_unqualified_step_bit_for_bit_on_cpu(monkeypatch):
  explicit = _train("float32")
  with jax.default_matmul_precision("default"):  # what the backend does by itself (CPU: float32)
    monkeypatch.setattr(stacked, "at_precision", lambda name, fn: fn)
    unqualified = _train("float32")
  for a, b in zip(jax.tree.leaves(explicit), jax.tree.leaves(unqualified), strict=True):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_precision_rounds_on_every_backend_and_stays_within_its_tolerance():
  f32, bf16 = _train("float32"), _train("bfloat16")
  # After 6 steps of lr 1e-2 from one init, in norm: weights and biases within 1% (measured 0.2-0.6%);
  # thresholds within 10% (4.6%: Adam moves each by ±lr a step, whichever way a near-zero
  # pseudo-gradient points). The local run measures what it costs in SAE quality (benchmarks/README.md).
  for name, tolerance in (("W_enc", 0.01), ("W_dec", 0.01), ("b_enc", 0.01), ("b_dec", 0.01), ("threshold", 0.1)):
    a, b = np.asarray(getattr(f32, name)), np.asarray(getattr(bf16, name))
    assert not np.array_equal(a, b), name  # bfloat16 operands really are rounded, on CPU too
    assert np.linalg.norm(a - b) <= tolerance * np.linalg.norm(a), name
  with pytest.raises(ValueError, match=r"precision 'tf32': expected one of \('float32', 'bfloat16'\)"):
    _train("tf32", steps=0)
