"""The headline figure: tokens/s of one JumpReLU training step (forward, backward, Adam update,
decoder constraints), float32, on this machine, for

- our sparse step (`train.step=sparse`, train/sparse.py) and our dense step (train/step.py), from
  a *trained-like state*: a planted dictionary whose features fire with heavy-tailed (Zipf)
  densities, thresholds at the quantiles that make L0 ≈ 64 on the batch (at initialization half
  the latents fire, which no trained SAE does);
- the real SAELens `JumpReLUTrainingSAE` step (training_forward_pass, backward, Adam, zero_grad)
  from the same state, in the same process;
- the dense roofline: 12·d·M FLOPs per token at this machine's float32 matmul peak, measured in
  the same run with a plain `jnp.matmul` of the step's own shape [B, d] @ [d, M]. No dense step
  can beat it; `*_roofline_multiple` says how far past it the sparse step goes.

Also: the sparse step with lazy Adam (`recipe.lazy_adam`, the default) against Adam updating
every latent every step, at the first and last shapes and at the widest one on 256 rows, where
most latents see no slot in a step. And at the first shape: a sweep of 8 stacked SAEs against 8
single steps and the step with `recipe.clip_grad_norm` against the plain one, its gradients
kept between its passes (as on CPU) and formed again (where they do not fit; dense, from
initialization), each compiled step's peak memory against params + Adam state + batch, and the
bfloat16 encoder matmul against the float32 one (the most a bfloat16 screening encoder could
gain). The last line printed is one JSON object.

Adam with β1 = 0 keeps no first moment (see train/optim.py), so "Adam state" is the second moment.

Run: PYTHONPATH=. python -m benchmarks.sae_step            (SHAPES=small for a quick check)
"""

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import seconds_per_call
from scope_jax.data.batch import Batch
from scope_jax.parallel.mesh import make_mesh, use_xnnpack_on_cpu
from scope_jax.sae.model import SAE
from scope_jax.train import run, stacked, tiling
from scope_jax.train.params import TrainParams
from scope_jax.train.selection import auto_capacity

SHAPES = [(640, 16_384, 4_096), (2_304, 16_384, 1_024), (640, 131_072, 4_096)]  # (d, M, batch)
if os.environ.get("SHAPES") == "small":
  SHAPES = [(640, 4_096, 1_024)]
L0, BANDWIDTH, LAMBDA = 64, 0.001, 6e-4


def trained_like(d: int, m: int, batch: int, seed: int = 0) -> tuple[SAE, np.ndarray]:
  """(a training-form SAE, a batch `[batch, d]` with E||x||² = 1) where latent i fires with
  density p_i ∝ 1/i^0.8 (at most 1/2), Σ p_i = L0: the batch is a sparse positive mix of the
  SAE's own decoder rows drawn with those densities, and each threshold is the (1 - p_i) quantile
  of its latent's pre-activations on the batch."""
  rng = np.random.default_rng(seed)
  W_md = rng.standard_normal((m, d), dtype=np.float32)
  W_md /= np.linalg.norm(W_md, axis=1, keepdims=True)
  p = 1.0 / np.arange(1, m + 1) ** 0.8
  p = np.minimum(p / p.sum() * L0, 0.5)
  features = rng.choice(m, size=(batch, L0), p=p / p.sum())
  magnitudes = rng.uniform(0.5, 1.5, (batch, L0)).astype(np.float32)
  x = np.zeros((batch, d), np.float32)
  for r in range(0, batch, 256):
    x[r : r + 256] = np.einsum("rk,rkd->rd", magnitudes[r : r + 256], W_md[features[r : r + 256]])
  x /= np.sqrt(np.mean(np.sum(x**2, axis=1)))
  theta = np.empty(m, np.float32)
  for c in range(0, m, 4096):
    pre = x @ W_md[c : c + 4096].T
    theta[c : c + 4096] = [np.quantile(pre[:, i], 1 - p[c + i]) for i in range(pre.shape[1])]
  sae = SAE(
    W_enc=np.ascontiguousarray(W_md.T),
    b_enc=np.zeros(m, np.float32),
    W_dec=W_md,
    b_dec=np.zeros(d, np.float32),
    threshold=np.maximum(theta, 1e-3),
  )
  return sae, x


def slots_per_token(sae: SAE, x: np.ndarray) -> np.ndarray:
  """Active or in-window latents per row (the sparse step's entries)."""
  counts = np.zeros(len(x), np.int64)
  for c in range(0, sae.width, 4096):
    pre = x @ sae.W_enc[:, c : c + 4096] + sae.b_enc[c : c + 4096]
    theta = sae.threshold[c : c + 4096]
    counts += np.sum((pre > theta) | (np.abs(pre - theta) < BANDWIDTH / 2), axis=1)
  return counts


def ours(d, m, batch, n_saes=1, repeats=5, clip=0.0, start=None, capacity=0, lazy=True, precision="float32"):
  """(seconds per step, compiled peak bytes, params+Adam+batch bytes); `clip`: recipe.clip_grad_norm;
  `start`: (SAE, batch) to step from (default: initialization, Gaussian rows); `capacity`: the
  sparse step's slots per token (0: the dense step); `lazy`: recipe.lazy_adam; `precision`: the
  step's matmuls' (parallel/precision.py)."""
  mesh = make_mesh(devices=jax.devices()[:1])
  groups = stacked.make_groups([m], [LAMBDA * (1 + i) for i in range(n_saes)])
  recipe = stacked.Recipe(
    lr_warmup_steps=10,
    sparsity_warmup_steps=0 if start else 10,
    bandwidth=BANDWIDTH,
    clip_grad_norm=clip,
    lazy_adam=lazy,
  )
  built = run.build(stacked.Sweep(tuple(groups), recipe, batch, precision=precision), mesh, np.zeros(d))
  init, shardings, step_fn = built.init, built.shardings, built.make_step((capacity,))
  state = init()
  if start is None:
    x = np.random.default_rng(0).normal(0, 1 / np.sqrt(d), (batch, d)).astype(np.float32)
  else:
    sae, x = start
    params = TrainParams.from_sae(jax.tree.map(lambda a: np.asarray(a)[None], sae))
    state["params"] = jax.device_put((params,), shardings["params"])
    nu = jax.tree.map(lambda a: np.full(a.shape, 1e-8, np.float32), params)  # a trained Adam state
    state["opt_state"]["nu"] = jax.device_put((nu,), shardings["opt_state"]["nu"])
  x = Batch(jax.device_put(x))
  compiled = step_fn.lower(state, x).compile()
  mem = compiled.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  base = sum(a.nbytes for a in jax.tree.leaves((state["params"], state["opt_state"]))) + x.x_bd.nbytes
  box = [state]
  ran_sparse = []

  def one_step():
    box[0], metrics = compiled(box[0], x)
    jax.block_until_ready(box[0])
    ran_sparse.append(float(metrics[0]["sparse"][0]))

  seconds, _ = seconds_per_call(one_step, repeats=repeats)
  if capacity and min(ran_sparse) < 1:
    raise RuntimeError(f"capacity {capacity}: a step fell back to the dense step; the timing is not the sparse step's")
  return seconds, peak, base


def saelens(start, repeats=5):
  """Seconds per SAELens training step from `start` = (SAE, batch)."""
  import torch
  from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
  from sae_lens.saes.sae import TrainStepInput

  params, x_np = start
  sae = JumpReLUTrainingSAE(
    JumpReLUTrainingSAEConfig(
      d_in=params.d_in, d_sae=params.width, jumprelu_bandwidth=BANDWIDTH, jumprelu_init_threshold=0.001
    )
  )
  with torch.no_grad():
    for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
      getattr(sae, k).copy_(torch.from_numpy(np.asarray(getattr(params, k))))
  opt = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=(0.0, 0.999), eps=1e-8)
  x = torch.from_numpy(x_np)

  def one_step():
    out = sae.training_forward_pass(
      TrainStepInput(
        sae_in=x, coefficients={"l0": LAMBDA}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
      )
    )
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  seconds, _ = seconds_per_call(one_step, repeats=repeats)
  return seconds


@contextlib.contextmanager
def gradients_formed_again():
  """The clipped step as it runs where one SAE's gradient does not fit (train/tiling.py): no gradient kept."""
  kept = tiling.HOST_GRADIENT_BYTES
  tiling.HOST_GRADIENT_BYTES = 0
  try:
    yield
  finally:
    tiling.HOST_GRADIENT_BYTES = kept


def matmul_peak(d, m, batch, dtype=jnp.float32):
  """FLOP/s of `[batch, d] @ [d, M]` in `dtype` (float32 accumulation)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((batch, d), np.float32), dtype)
  b = jnp.asarray(np.random.default_rng(1).standard_normal((d, m), np.float32), dtype)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  seconds, _ = seconds_per_call(lambda: matmul(a, b).block_until_ready(), repeats=10)
  return 2 * batch * d * m / seconds


def lazy_adam(headline: dict, starts: dict) -> None:
  """The sparse step with and without lazy Adam, at the first and the last shape's full batch and at
  the last shape (the widest) on 256 of its rows, where most latents see no slot in a step.
  `starts`: the trained-like (SAE, batch) of each shape."""
  for d, m, batch, rows in (*((d, m, b, b) for d, m, b in (SHAPES[0], SHAPES[-1])), (*SHAPES[-1], 256)):
    sae, x = starts[d, m, batch]
    start = (sae, x[:rows])
    capacity = auto_capacity(slots_per_token(*start).max(), m)
    repeats = 2 if m > 65_536 else 3
    seconds = {lazy: ours(d, m, rows, repeats=repeats, start=start, capacity=capacity, lazy=lazy)[0] for lazy in (1, 0)}
    pre = start[1] @ sae.W_enc
    touched = np.mean(np.any((pre > sae.threshold) | (np.abs(pre - sae.threshold) < BANDWIDTH / 2), axis=0))
    key = f"lazy_adam_speedup_d{d}_m{m // 1024}k_b{rows}"
    headline[key] = seconds[0] / seconds[1]
    print(
      f"lazy Adam, sparse step, d={d} M={m} B={rows} ({touched:.0%} of latents touched per step): "
      f"{seconds[1]:.3f}s per step against {seconds[0]:.3f}s updating every latent = {headline[key]:.2f}x"
    )


def main():
  import torch

  use_xnnpack_on_cpu()
  torch.set_num_threads(os.cpu_count())
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, torch {torch.__version__}, jax {jax.__version__}")
  results, starts = [], {}
  for d, m, batch in SHAPES:
    start = starts[d, m, batch] = trained_like(d, m, batch)
    slots = slots_per_token(*start)
    capacity = auto_capacity(slots.max(), m)
    repeats = 2 if m > 65_536 else 5
    peak_flops = matmul_peak(d, m, batch)
    t_dense, peak_dense, base = ours(d, m, batch, repeats=repeats, start=start)
    t_sparse, peak_sparse, _ = ours(d, m, batch, repeats=repeats, start=start, capacity=capacity)
    t_lens = saelens(start, repeats=repeats)
    roofline_tps = peak_flops / (12 * d * m)
    r = {
      "d": d,
      "M": m,
      "batch": batch,
      "l0": float(np.mean(np.sum(start[1] @ start[0].W_enc > start[0].threshold, axis=1))),
      "slots_mean": float(slots.mean()),
      "slots_max": int(slots.max()),
      "capacity": capacity,
      "tokens_per_s": batch / t_dense,
      "sparse_tokens_per_s": batch / t_sparse,
      "saelens_tokens_per_s": batch / t_lens,
      "ratio_vs_saelens": t_lens / t_dense,
      "sparse_ratio_vs_saelens": t_lens / t_sparse,
      "sparse_vs_dense": t_dense / t_sparse,
      "roofline_tokens_per_s": roofline_tps,
      "roofline_fraction": batch / t_dense / roofline_tps,
      "sparse_roofline_multiple": batch / t_sparse / roofline_tps,
      "matmul_gflops": peak_flops / 1e9,
      "peak_memory_ratio": peak_dense / base,
      "sparse_peak_memory_ratio": peak_sparse / base,
      "peak_memory_mib": peak_dense / 2**20,
      "sparse_peak_memory_mib": peak_sparse / 2**20,
    }
    print(
      f"d={d} M={m} B={batch}, L0 {r['l0']:.1f}, slots/token {r['slots_mean']:.1f} (max {r['slots_max']}, "
      f"capacity {capacity}): sparse {r['sparse_tokens_per_s']:,.0f} tok/s = {r['sparse_roofline_multiple']:.2f}x "
      f"the dense roofline ({roofline_tps:,.0f} tok/s at {r['matmul_gflops']:.0f} GFLOP/s), "
      f"{r['sparse_ratio_vs_saelens']:.2f}x SAELens, {r['sparse_vs_dense']:.2f}x our dense step; "
      f"dense {r['tokens_per_s']:,.0f} tok/s ({r['roofline_fraction']:.0%} of roofline, "
      f"{r['ratio_vs_saelens']:.2f}x SAELens {r['saelens_tokens_per_s']:,.0f} tok/s); peak memory "
      f"{r['sparse_peak_memory_ratio']:.2f}x (sparse) / {r['peak_memory_ratio']:.2f}x (dense) params+Adam+batch"
    )
    results.append(r)
  headline = results[0]
  for r in results[1:]:
    suffix = "_131k" if r["M"] == 131_072 else f"_d{r['d']}"
    kept = ("sparse_roofline_multiple", "sparse_ratio_vs_saelens", "roofline_fraction", "sparse_peak_memory_ratio")
    headline |= {f"{k}{suffix}": r[k] for k in kept}
  lazy_adam(headline, starts)
  d, m, batch = SHAPES[0]
  headline["bf16_encoder_speedup"] = matmul_peak(d, m, batch, jnp.bfloat16) / matmul_peak(d, m, batch)
  print(f"bfloat16 encoder matmul: {headline['bf16_encoder_speedup']:.2f}x the float32 one")
  singles, sweeps = [], []
  for _ in range(2):  # alternated, best of each: single runs on this machine move by ±20%
    singles.append(ours(d, m, batch, repeats=3)[0])
    sweeps.append(ours(d, m, batch, n_saes=8, repeats=2)[0])
  headline["sweep8_vs_8_single"] = min(sweeps) / (8 * min(singles))
  print(
    f"sweep of 8 stacked SAEs: {min(sweeps):.2f}s per step = {headline['sweep8_vs_8_single']:.2f}x "
    f"8 single steps ({min(singles):.2f}s each)"
  )
  plain, clipped, formed_again = [], [], []
  for _ in range(2):
    plain.append(ours(d, m, batch, repeats=3)[0])
    clipped.append(ours(d, m, batch, repeats=3, clip=1e-3)[0])
    with gradients_formed_again():
      formed_again.append(ours(d, m, batch, repeats=3, clip=1e-3)[0])
  headline["clipped_vs_plain"] = min(clipped) / min(plain)
  headline["clipped_formed_again_vs_plain"] = min(formed_again) / min(plain)
  print(
    f"with recipe.clip_grad_norm (one more pass for the gradient's norm), gradients kept between the passes: "
    f"{min(clipped):.2f}s per step = {headline['clipped_vs_plain']:.2f}x the plain step ({min(plain):.2f}s); "
    f"formed again in the update: {min(formed_again):.2f}s = {headline['clipped_formed_again_vs_plain']:.2f}x"
  )
  print(json.dumps(headline))


if __name__ == "__main__":
  main()
