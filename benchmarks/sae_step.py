"""The headline figure: tokens/s of one JumpReLU training step (forward, backward, Adam update,
decoder constraints), float32, on this machine, beside

- the real SAELens `JumpReLUTrainingSAE` step (training_forward_pass, backward, Adam, zero_grad)
  on the same shapes, in the same process;
- the roofline: 12·d·M FLOPs per token at this machine's float32 matmul peak, measured in the
  same run with a plain `jnp.matmul` of the step's own shape [B, d] @ [d, M].

Also: a sweep of 8 stacked SAEs against 8 single steps, the step with `recipe.clip_grad_norm`
against the plain one, and the compiled step's peak memory against params + Adam state + batch.
The step is the trainer's: blocked over latents
(`train/step.py`, automatic block size), which does 14·d·M FLOPs per token, one encoder
matmul more than the roofline counts. The last line printed is one JSON object.

Adam with β1 = 0 keeps no first moment (see train/optim.py), so "Adam state" is the second moment.

Run: PYTHONPATH=. python -m benchmarks.sae_step            (SHAPES=small for a quick check)
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.common import seconds_per_call
from scope_jax.parallel.mesh import make_mesh, use_xnnpack_on_cpu
from scope_jax.train import stacked
from scope_jax.train.step import latent_block

SHAPES = [(640, 16_384, 4_096), (2_304, 16_384, 1_024)]  # (d, M, batch)
if os.environ.get("SHAPES") == "small":
  SHAPES = [(640, 4_096, 1_024)]


def ours(d, m, batch, n_saes=1, repeats=5, clip=0.0):
  """(seconds per step, compiled peak bytes, params+Adam+batch bytes); `clip`: recipe.clip_grad_norm."""
  mesh = make_mesh(devices=jax.devices()[:1])
  groups = stacked.make_groups([m], [6e-4 * (1 + i) for i in range(n_saes)])
  recipe = stacked.Recipe(lr_warmup_steps=10, sparsity_warmup_steps=10, bandwidth=0.001, clip_grad_norm=clip)
  init, _, step_fn = stacked.build(0, np.zeros(d), groups, recipe, mesh, batch)
  state = init()
  x = jax.device_put(np.random.default_rng(0).normal(0, 1 / np.sqrt(d), (batch, d)).astype(np.float32))
  compiled = step_fn.lower(state, x).compile()
  mem = compiled.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  base = sum(a.nbytes for a in jax.tree.leaves((state["params"], state["opt_state"]))) + x.nbytes
  box = [state]

  def run():
    box[0], metrics = compiled(box[0], x)
    jax.block_until_ready(box[0])

  seconds, _ = seconds_per_call(run, repeats=repeats)
  return seconds, peak, base


def saelens(d, m, batch, repeats=5):
  from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
  from sae_lens.saes.sae import TrainStepInput

  sae = JumpReLUTrainingSAE(
    JumpReLUTrainingSAEConfig(d_in=d, d_sae=m, jumprelu_bandwidth=0.001, jumprelu_init_threshold=0.001)
  )
  opt = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=(0.0, 0.999), eps=1e-8)
  x = torch.randn(batch, d) / d**0.5

  def run():
    out = sae.training_forward_pass(
      TrainStepInput(
        sae_in=x, coefficients={"l0": 6e-4}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
      )
    )
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  seconds, _ = seconds_per_call(run, repeats=repeats)
  return seconds


def matmul_peak(d, m, batch):
  a = jnp.asarray(np.random.default_rng(0).standard_normal((batch, d), np.float32))
  b = jnp.asarray(np.random.default_rng(1).standard_normal((d, m), np.float32))
  matmul = jax.jit(jnp.matmul)
  seconds, _ = seconds_per_call(lambda: matmul(a, b).block_until_ready(), repeats=10)
  return 2 * batch * d * m / seconds


def main():
  use_xnnpack_on_cpu()
  torch.set_num_threads(os.cpu_count())
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, torch {torch.__version__}, jax {jax.__version__}")
  results = []
  for d, m, batch in SHAPES:
    peak_flops = matmul_peak(d, m, batch)
    t_ours, peak_bytes, base_bytes = ours(d, m, batch)
    t_lens = saelens(d, m, batch)
    roofline_tps = peak_flops / (12 * d * m)
    r = {
      "d": d,
      "M": m,
      "batch": batch,
      "tokens_per_s": batch / t_ours,
      "saelens_tokens_per_s": batch / t_lens,
      "ratio_vs_saelens": t_lens / t_ours,
      "roofline_tokens_per_s": roofline_tps,
      "roofline_fraction": batch / t_ours / roofline_tps,
      "matmul_gflops": peak_flops / 1e9,
      "peak_memory_ratio": peak_bytes / base_bytes,
      "peak_memory_mib": peak_bytes / 2**20,
    }
    print(
      f"d={d} M={m} B={batch} (latent block {latent_block(m, batch)}): ours {r['tokens_per_s']:,.0f} tok/s, "
      f"SAELens {r['saelens_tokens_per_s']:,.0f} tok/s "
      f"({r['ratio_vs_saelens']:.2f}x); roofline {roofline_tps:,.0f} tok/s at {r['matmul_gflops']:.0f} GFLOP/s "
      f"({r['roofline_fraction']:.0%}); peak memory {r['peak_memory_mib']:,.0f} MiB = "
      f"{r['peak_memory_ratio']:.2f}x params+Adam+batch"
    )
    results.append(r)
  d, m, batch = SHAPES[0]
  singles, sweeps = [], []
  for _ in range(2):  # alternated, best of each: single runs on this machine move by ±20%
    singles.append(ours(d, m, batch, repeats=3)[0])
    sweeps.append(ours(d, m, batch, n_saes=8, repeats=2)[0])
  results[0]["sweep8_vs_8_single"] = min(sweeps) / (8 * min(singles))
  print(
    f"sweep of 8 stacked SAEs: {min(sweeps):.2f}s per step = {results[0]['sweep8_vs_8_single']:.2f}x "
    f"8 single steps ({min(singles):.2f}s each)"
  )
  plain, clipped = [], []
  for _ in range(2):
    plain.append(ours(d, m, batch, repeats=3)[0])
    clipped.append(ours(d, m, batch, repeats=3, clip=1e-3)[0])
  results[0]["clipped_vs_plain"] = min(clipped) / min(plain)
  print(
    f"with recipe.clip_grad_norm (one more pass for the gradient's norm): {min(clipped):.2f}s per step = "
    f"{results[0]['clipped_vs_plain']:.2f}x the plain step ({min(plain):.2f}s)"
  )
  print(json.dumps(results[0]))


if __name__ == "__main__":
  main()
