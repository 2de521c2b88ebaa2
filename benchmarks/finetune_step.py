"""What one KL finetuning step costs (finetune/kl.py), float32, on this machine, for an SAE at res.6
of Gemma 3 270M (the local run's site), batch 8 × 128 tokens:

- the shared part of a step, once per batch and site: the forward up to the site and the clean
  forward from it to the log-probabilities;
- one SAE's step: its splice, the forward from the site through 11 layers and the 262K-row
  unembedding, KL and the backward through all of it to the SAE, Adam;
- the bound: the step's matmul FLOPs per token (the layers after the site and the unembedding,
  forward and backward to their input: 4 FLOPs per weight; the SAE's 6·d·M) at this machine's
  float32 matmul peak, measured in the same run on the unembedding's own shape; and the
  unembedding's share of those FLOPs.

The last line printed is one JSON object.

Run: PYTHONPATH=. python -m benchmarks.finetune_step            (--small for a quick check)
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import seconds_per_call
from benchmarks.sae_step import matmul_peak
from scope_jax.finetune import kl
from scope_jax.models.lm import load_model
from scope_jax.models.sites import parse_site
from scope_jax.parallel.mesh import make_mesh, use_xnnpack_on_cpu
from scope_jax.sae.model import init_sae

SITE, WIDTH, BATCH, SEQ = "res.6", 2_048, 8, 128
if "--small" in sys.argv:  # a check that it runs: two layers after the site, 2 × 32 tokens
  SITE, WIDTH, BATCH, SEQ = "res.15", 256, 2, 32


def after_site_weights(lm, layer: int) -> int:
  """Matmul weights of the layers after `layer` (norm scales excluded)."""
  state = nnx.to_pure_dict(lm.parts()[1])
  return sum(
    int(np.prod(x.shape))
    for i, block in state["layers"].items()
    if int(i) > layer
    for x in jax.tree.leaves(block)
    if x.ndim >= 2
  )


def main():
  use_xnnpack_on_cpu()
  lm = load_model("gemma3-270m", mesh=make_mesh(devices=jax.devices()[:1]))
  site, d, vocab = parse_site(SITE, lm.config), lm.config.d_model, lm.config.vocab_size
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, vocab, (BATCH, SEQ)).astype(np.int32)
  tokens[:, 0] = lm.config.bos_id
  graphdef, params = lm.parts()
  clean = jax.jit(lambda p, r, a: kl.clean_log_probs(nnx.merge(graphdef, p), r, a, site))
  holder = {}

  def shared():
    resid, act, _ = lm.to_site(tokens, SITE)
    holder["batch"] = (resid, act, clean(params, resid, act))
    jax.block_until_ready(holder["batch"])

  shared_s, shared_gib = seconds_per_call(shared, repeats=3)
  resid, act, logp = holder["batch"]
  scale = float(jnp.sqrt(jnp.mean(jnp.sum(jnp.square(act[:, 1:]), -1))))
  keep = np.ones((BATCH, SEQ), np.float32)
  keep[:, 0] = 0
  batch = kl.Batch(resid, act, act, logp, jnp.asarray(keep), jnp.ones((BATCH, SEQ - 1), jnp.float32))
  spec = kl.KLSpec(site, scale, scale)
  tx = kl.optimizer(1e-4, 100, 0, "linear", 0.0, 0.999, 0.0)
  step = kl.jitted_step(spec, tx, lm.precision, graphdef)
  holder["state"] = kl.init_state(init_sae(jax.random.key(0), d, WIDTH, 0.05), tx, 1e-3)

  def one_step():
    holder["state"], terms = step(holder["state"], params, batch)
    jax.block_until_ready(terms)

  step_s, step_gib = seconds_per_call(one_step, repeats=3)
  tokens_per_batch = BATCH * SEQ
  unembed_flops = 4 * vocab * d  # forward and backward to the input, per token
  flops = unembed_flops + 4 * after_site_weights(lm, site.layer) + 6 * d * WIDTH
  peak = matmul_peak(d, 16_384, tokens_per_batch)
  bound_s = flops * tokens_per_batch / peak
  out = {
    "benchmark": "finetune_step",
    "site": SITE,
    "width": WIDTH,
    "tokens_per_step": tokens_per_batch,
    "shared_tok_s": round(tokens_per_batch / shared_s),
    "sae_step_tok_s": round(tokens_per_batch / step_s),
    "bound_tok_s": round(tokens_per_batch / bound_s),
    "step_vs_bound": round(bound_s / step_s, 3),
    "unembedding_share_of_flops": round(unembed_flops / flops, 3),
    "gflop_per_token": round(flops / 1e9, 3),
    "matmul_gflops": round(peak / 1e9, 1),
    "peak_gib": round(max(shared_gib, step_gib), 2),
  }
  print(
    f"{SITE}, width {WIDTH}, {BATCH} × {SEQ} tokens: shared part {out['shared_tok_s']:,} tok/s (once per batch and "
    f"site); one SAE's step {out['sae_step_tok_s']:,} tok/s = {out['step_vs_bound']:.0%} of the bound "
    f"{out['bound_tok_s']:,} tok/s ({out['gflop_per_token']} GFLOP/token at {out['matmul_gflops']} GFLOP/s, the "
    f"unembedding {out['unembedding_share_of_flops']:.0%} of it); peak +{out['peak_gib']} GiB",
    flush=True,
  )
  print(json.dumps(out))


if __name__ == "__main__":
  main()
