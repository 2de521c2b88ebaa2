"""tokens/s of one cross-layer transcoder training step (train/clt.py: forward, backward, Adam), float32,
on this machine, for a CLT over Gemma 3 270M's 18 layers (d = 640) at several widths F per layer:

- the dense step, and the sparse step (capacity 64 slots per row and layer) from a state whose
  thresholds let ~16 latents per row and layer fire (a trained CLT's L0 per layer);
- the dense roofline: 6·d·F·(L + L(L+1)/2) FLOPs per token (the encoder and the triangular decoder,
  forward and backward) at this machine's float32 matmul peak on the first decoder's own
  `[batch, F] @ [F, L·d]`, measured in the same run.

The last line printed is one JSON object.

Run: PYTHONPATH=. python -m benchmarks.clt_step            (--small for a quick check)
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import seconds_per_call
from benchmarks.sae_step import matmul_peak
from scope_jax.parallel.mesh import make_mesh, use_xnnpack_on_cpu
from scope_jax.train import clt
from scope_jax.train.stacked import Recipe

L, D, CAPACITY, FIRING = 18, 640, 64, 16
SHAPES = [(256, 1_024), (1_024, 1_024), (2_048, 256)]  # (F, batch)
if os.environ.get("SHAPES") == "small" or "--small" in sys.argv:  # a check that it runs: 4 layers
  L, SHAPES = 4, [(64, 128)]


def state_and_rows(sweep, mesh, batch):
  """A fresh state with each layer's θ at the pre-activation quantile that fires ~FIRING latents per row."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, L, D)).astype(np.float32) / np.sqrt(D))
  y = jnp.asarray(rng.normal(size=(batch, L, D)).astype(np.float32) / np.sqrt(D))
  init, _ = clt.initializer(sweep, mesh, np.zeros((L, D)), D)
  state = init()
  p = state["params"]
  pre = jnp.einsum("bld,sldf->slbf", x, p.W_enc) + p.b_enc[:, :, None, :]
  theta = jnp.quantile(pre, 1 - FIRING / sweep.width, axis=(2, 3))  # [S, L]
  threshold = jnp.broadcast_to(theta[..., None], p.threshold.shape)
  return state | {"params": p.replace(threshold=threshold)}, x, y


def step_seconds(width, batch, capacity, mesh):
  sweep = clt.CLTSweep(L, width, ((1e-3, 0),), Recipe(lr=1e-4, lr_warmup_steps=0, bandwidth=0.01), batch, 100, capacity)
  state, x, y = state_and_rows(sweep, mesh, batch)
  step = clt.make_step(sweep, mesh)
  holder = {"state": state}

  def run():
    holder["state"], stats = step(holder["state"], x, y)
    jax.block_until_ready(holder["state"])
    holder["stats"] = stats

  seconds, gib = seconds_per_call(run, repeats=3)
  return seconds, gib, float(holder["stats"]["sparse"][0]), float(np.mean(holder["stats"]["l0_l"][0]))


def main():
  use_xnnpack_on_cpu()
  mesh = make_mesh(devices=jax.devices()[:1])
  rows = []
  for width, batch in SHAPES:
    peak = matmul_peak(width, L * D, batch) / 1e9  # GFLOP/s
    flops = 6 * D * width * (L + L * (L + 1) // 2) * batch
    dense_s, dense_gib, _, l0 = step_seconds(width, batch, 0, mesh)
    sparse_s, sparse_gib, sparse_fraction, _ = step_seconds(width, batch, CAPACITY, mesh)
    roof_s = flops / (peak * 1e9)
    row = {
      "F": width,
      "batch": batch,
      "l0_per_layer": round(l0, 1),
      "dense_tok_s": round(batch / dense_s),
      "sparse_tok_s": round(batch / sparse_s),
      "sparse_layers_fraction": sparse_fraction,
      "roofline_tok_s": round(batch / roof_s),
      "dense_vs_roofline": round(roof_s / dense_s, 3),
      "sparse_vs_dense": round(dense_s / sparse_s, 3),
      "peak_gib": round(max(dense_gib, sparse_gib), 2),
      "matmul_gflops": round(peak, 1),
    }
    rows.append(row)
    print(
      f"F {width:>5} batch {batch:>5}: dense {row['dense_tok_s']:>7,} tok/s ({row['dense_vs_roofline']:.0%} of the "
      f"roofline {row['roofline_tok_s']:,}), sparse {row['sparse_tok_s']:>7,} tok/s "
      f"({row['sparse_vs_dense']:.2f}× dense; "
      f"{sparse_fraction:.0%} of layers sparse), L0/layer {l0:.1f}",
      flush=True,
    )
  print(json.dumps({"benchmark": "clt_step", "layers": L, "d": D, "capacity": CAPACITY, "rows": rows}))


if __name__ == "__main__":
  main()
