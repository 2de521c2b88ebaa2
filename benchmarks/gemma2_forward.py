"""Gemma 2 2B-width forward throughput at reduced depth, ours vs transformers, same weights.

d_model 2304, 8 heads / 4 kv, head_dim 256, d_ff 9216, vocab 256,000 (Gemma 2 2B) with
LAYERS layers of random weights; full forward with logits, batch 4 x 256, float32, this CPU.

Run: python benchmarks/gemma2_forward.py [LAYERS]
"""

import json
import sys
import tempfile

import jax
import numpy as np
import torch

import scope_jax as sj
from benchmarks.common import seconds_per_call

BATCH, SEQ = 4, 256


def main(layers: int):
  sj.parallel.mesh.use_xnnpack_on_cpu()
  from transformers import Gemma2Config, Gemma2ForCausalLM

  config = Gemma2Config(num_hidden_layers=layers)  # the 2B defaults otherwise
  torch.manual_seed(0)
  model = Gemma2ForCausalLM(config).eval()
  tokens = np.random.default_rng(0).integers(3, 256_000, (BATCH, SEQ)).astype(np.int32)
  n_tokens = BATCH * SEQ
  ids = torch.as_tensor(tokens, dtype=torch.long)
  with torch.inference_mode():
    hf, mem_hf = seconds_per_call(lambda: model(ids), repeats=3)
  with tempfile.TemporaryDirectory() as directory:
    model.save_pretrained(directory)
    model = None  # free its memory before ours loads
    lm = sj.load_model(directory, mesh=sj.make_mesh(devices=jax.devices()[:1]))
  ours, mem_ours = seconds_per_call(lambda: lm.logits(tokens).block_until_ready(), repeats=3)
  rows = {
    "layers": layers,
    "ours_tokens_per_s": n_tokens / ours,
    "hf_tokens_per_s": n_tokens / hf,
    "ratio": hf / ours,
    "ours_peak_gib": mem_ours,
    "hf_peak_gib": mem_hf,
  }
  print(
    f"Gemma 2 2B width, {layers} layers, {BATCH}x{SEQ} tokens: ours {rows['ours_tokens_per_s']:.0f} tok/s "
    f"(peak +{mem_ours:.2f} GiB), transformers {rows['hf_tokens_per_s']:.0f} tok/s "
    f"(peak +{mem_hf:.2f} GiB), ratio {rows['ratio']:.2f}x"
  )
  print(json.dumps(rows))


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
