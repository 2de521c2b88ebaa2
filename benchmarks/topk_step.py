"""tokens/s of one TopK and one BatchTopK training step (forward, backward, Adam, decoder
constraints; AuxK on, a tenth of the latents dead), float32, on this machine, for

- our dense and sparse steps (train/topk.py) from a trained-like state (benchmarks/sae_step.py's:
  a planted dictionary firing with Zipf densities), k = 64;
- SAELens' `TopKTrainingSAE` / `BatchTopKTrainingSAE` step from the same state (training_forward_pass
  with the same dead mask, backward, Adam), in the same process;
- the dense roofline: 12·d·M FLOPs per token at this machine's float32 matmul peak on the step's
  own [B, d] @ [d, M], measured in the same run.

And the cost of finding the kept latents at the first shape: `lax.top_k` of each row against
sae/topk.py's bisection (the thresholds the step uses) against the encoder matmul itself.
The last line printed is one JSON object.

Run: PYTHONPATH=. python -m benchmarks.topk_step            (SHAPES=small for a quick check)
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import seconds_per_call
from benchmarks.sae_step import matmul_peak, trained_like
from scope_jax.data.batch import Batch
from scope_jax.parallel.mesh import make_mesh, use_xnnpack_on_cpu
from scope_jax.sae.topk import row_threshold
from scope_jax.train import run, stacked
from scope_jax.train.params import TrainParams

SHAPES = [(640, 2_048, 1_024), (640, 16_384, 4_096), (2_304, 16_384, 1_024)]  # (d, M, batch)
if os.environ.get("SHAPES") == "small":
  SHAPES = [(640, 2_048, 1_024)]
K, DEAD, AUX_ALPHA = 64, 0.1, 1 / 32


def dead_mask(m: int) -> np.ndarray:
  return np.arange(m) % int(1 / DEAD) == 0


def ours(activation, start, capacity=0, repeats=5):
  """(seconds per step, whether every timed step ran sparse)."""
  sae, x = start
  d, m, batch = sae.d_in, sae.width, len(x)
  mesh = make_mesh(devices=jax.devices()[:1])
  recipe = stacked.Recipe(lr_warmup_steps=10, auxk_coefficient=AUX_ALPHA, dead_window_steps=10)
  groups = stacked.make_groups([m], [K], activation=activation)
  built = run.build(stacked.Sweep(tuple(groups), recipe, batch), mesh, np.zeros(d))
  state = built.init()
  params = TrainParams.from_sae(
    jax.tree.map(lambda a: np.asarray(a)[None], sae.replace(threshold=np.zeros(m, np.float32)))
  )
  state["params"] = jax.device_put((params,), built.shardings["params"])
  since = np.where(dead_mask(m), 10, 0)[None].astype(np.int32)
  state["since_fired"] = (jax.device_put(since, state["since_fired"][0].sharding),)
  rows = Batch(jax.device_put(x))
  compiled = built.make_step((capacity,)).lower(state, rows).compile()
  box, ran_sparse = [state], []

  def one_step():
    box[0], metrics = compiled(box[0], rows)
    jax.block_until_ready(box[0])
    ran_sparse.append(float(metrics[0]["sparse"][0]))

  seconds, _ = seconds_per_call(one_step, repeats=repeats)
  return seconds, min(ran_sparse) == 1


def saelens(activation, start, repeats=5):
  import torch
  from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
  from sae_lens.saes.sae import TrainStepInput
  from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

  sae_np, x_np = start
  cls, cfg_cls = (
    (TopKTrainingSAE, TopKTrainingSAEConfig)
    if activation == "topk"
    else (
      BatchTopKTrainingSAE,
      BatchTopKTrainingSAEConfig,
    )
  )
  sae = cls(cfg_cls(d_in=sae_np.d_in, d_sae=sae_np.width, k=K, aux_loss_coefficient=AUX_ALPHA))
  with torch.no_grad():
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
      getattr(sae, k).copy_(torch.from_numpy(np.asarray(getattr(sae_np, k))))
  opt = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=(0.0, 0.999), eps=1e-8)
  x, dead = torch.from_numpy(x_np), torch.from_numpy(dead_mask(sae_np.width))

  def one_step():
    step_input = TrainStepInput(
      sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )
    out = sae.training_forward_pass(step_input)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  seconds, _ = seconds_per_call(one_step, repeats=repeats)
  return seconds


def selection_cost(d, m, batch):
  """(seconds of lax.top_k per row, of the bisection's row thresholds, of the encoder matmul)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, d), np.float32))
  w = jnp.asarray(rng.standard_normal((d, m), np.float32))
  pre = x @ w
  top_k = jax.jit(lambda p: jax.lax.top_k(p, K)[0][:, -1])
  bisection = jax.jit(lambda p: row_threshold(p, K))
  encoder = jax.jit(lambda x, w: x @ w)
  np.testing.assert_array_equal(top_k(pre), bisection(pre))  # the same k-th value
  return tuple(
    seconds_per_call(lambda f=f, a=a: f(*a).block_until_ready(), repeats=10)[0]
    for f, a in ((top_k, (pre,)), (bisection, (pre,)), (encoder, (x, w)))
  )


def main():
  import torch

  use_xnnpack_on_cpu()
  torch.set_num_threads(os.cpu_count())
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, torch {torch.__version__}, jax {jax.__version__}")
  headline = {}
  for d, m, batch in SHAPES:
    start = trained_like(d, m, batch)
    peak = matmul_peak(d, m, batch)
    roofline = peak / (12 * d * m)
    repeats = 3 if m * batch > 2**25 else 5
    for activation in ("topk", "batchtopk"):
      dense, _ = ours(activation, start, repeats=repeats)
      capacity = K + min(d // 2, int(DEAD * m))  # k kept + k_aux dead per token (BatchTopK: room for 1.5x)
      capacity = int(1.5 * capacity) if activation == "batchtopk" else capacity
      sparse, always_sparse = ours(activation, start, capacity=capacity, repeats=repeats)
      lens = saelens(activation, start, repeats=repeats)
      key = f"{activation}_d{d}_m{m // 1024}k_b{batch}"
      headline[key] = r = {
        "dense_tokens_per_s": batch / dense,
        "sparse_tokens_per_s": batch / sparse,
        "sparse_ran_every_step": always_sparse,
        "saelens_tokens_per_s": batch / lens,
        "dense_vs_saelens": lens / dense,
        "sparse_vs_saelens": lens / sparse,
        "roofline_tokens_per_s": roofline,
        "dense_roofline_fraction": batch / dense / roofline,
        "sparse_roofline_multiple": batch / sparse / roofline,
      }
      print(
        f"{activation} d={d} M={m} B={batch}, k {K}, {DEAD:.0%} dead (AuxK on): dense {r['dense_tokens_per_s']:,.0f} "
        f"tok/s ({r['dense_roofline_fraction']:.0%} of the roofline {roofline:,.0f} tok/s at {peak / 1e9:.0f} "
        f"GFLOP/s, {r['dense_vs_saelens']:.2f}x SAELens); sparse {r['sparse_tokens_per_s']:,.0f} tok/s "
        f"({r['sparse_roofline_multiple']:.2f}x the roofline, {r['sparse_vs_saelens']:.2f}x SAELens"
        f"{'' if always_sparse else ', fell back to dense on some steps'}); "
        f"SAELens {r['saelens_tokens_per_s']:,.0f} tok/s"
      )
  d, m, batch = SHAPES[0]
  top_k, bisection, encoder = selection_cost(d, m, batch)
  headline["selection"] = {"top_k_vs_encoder": top_k / encoder, "bisection_vs_encoder": bisection / encoder}
  print(
    f"the kept latents at d={d} M={m} B={batch}: lax.top_k {top_k * 1e3:.1f} ms = {top_k / encoder:.1f}x the encoder "
    f"matmul ({encoder * 1e3:.1f} ms); bisection (sae/topk.py) {bisection * 1e3:.1f} ms = {bisection / encoder:.1f}x"
  )
  print(json.dumps(headline))


if __name__ == "__main__":
  main()
