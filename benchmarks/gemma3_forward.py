"""Gemma 3 270M forward throughput, ours vs transformers on the same GGUF, batch 8 x 256, float32.

(a) equal work: every layer, no unembedding (transformers: `model.model(...)`);
(b) what an extraction user gets: ours stops after `res.6`; transformers runs the full forward
    with a hook at that layer, as hook-based extraction pipelines do.

Run: python benchmarks/gemma3_forward.py
"""

import json
import os

import jax
import numpy as np
import torch

import scope_jax as sj
from benchmarks.common import matmul_peak_gflops, seconds_per_call
from scope_jax.models.embedded import embedded_gguf_path

BATCH, SEQ, SITE_LAYER = 8, 256, 6


def main():
  sj.parallel.mesh.use_xnnpack_on_cpu()
  path = embedded_gguf_path("gemma3-270m")
  lm = sj.load_model(path, mesh=sj.make_mesh(devices=jax.devices()[:1]))
  tokens = np.random.default_rng(0).integers(3, 200_000, (BATCH, SEQ)).astype(np.int32)
  n_tokens = BATCH * SEQ
  last = f"res.{lm.config.n_layers - 1}"
  ours_all, mem_ours_all = seconds_per_call(lambda: lm.activations(tokens, [last])[last].block_until_ready())
  ours_site, mem_ours_site = seconds_per_call(
    lambda: lm.activations(tokens, [f"res.{SITE_LAYER}"])[f"res.{SITE_LAYER}"].block_until_ready()
  )
  lm = None  # free its memory before the reference model loads

  from transformers import AutoModelForCausalLM

  directory, name = os.path.split(path)
  model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
  ids = torch.as_tensor(tokens, dtype=torch.long)
  captured = {}
  model.model.layers[SITE_LAYER].register_forward_hook(lambda m, i, o: captured.update(x=o))
  with torch.inference_mode():
    hf_body, mem_hf_body = seconds_per_call(lambda: model.model(ids), repeats=3)
    hf_full, mem_hf_full = seconds_per_call(lambda: model(ids), repeats=3)

  c = model.config
  per_layer = (
    c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    + c.num_attention_heads * c.head_dim * c.hidden_size
    + 3 * c.hidden_size * c.intermediate_size
  )
  body_gflop = 2 * per_layer * c.num_hidden_layers * n_tokens / 1e9  # projections and MLP only
  jax_peak, torch_peak = matmul_peak_gflops()
  rows = {
    "threads": torch.get_num_threads(),
    "jax_matmul_peak_gflops": jax_peak,
    "torch_matmul_peak_gflops": torch_peak,
    "a_ours_fraction_of_jax_peak": body_gflop / ours_all / jax_peak,
    "a_hf_fraction_of_torch_peak": body_gflop / hf_body / torch_peak,
    "a_ours_tokens_per_s": n_tokens / ours_all,
    "a_hf_tokens_per_s": n_tokens / hf_body,
    "a_ratio": hf_body / ours_all,
    "a_ours_peak_gib": mem_ours_all,
    "a_hf_peak_gib": mem_hf_body,
    "b_ours_tokens_per_s": n_tokens / ours_site,
    "b_hf_tokens_per_s": n_tokens / hf_full,
    "b_ratio": hf_full / ours_site,
    "b_ours_peak_gib": mem_ours_site,
    "b_hf_peak_gib": mem_hf_full,
  }
  print(
    f"(a) every layer, no unembedding: ours {rows['a_ours_tokens_per_s']:.0f} tok/s, "
    f"transformers {rows['a_hf_tokens_per_s']:.0f} tok/s, ratio {rows['a_ratio']:.2f}x "
    f"(peak +{mem_ours_all:.2f} / +{mem_hf_body:.2f} GiB)"
  )
  print(
    f"    matmul peak in this run: JAX {jax_peak:.0f} GFLOP/s, torch {torch_peak:.0f} GFLOP/s; "
    f"(a) runs at {rows['a_ours_fraction_of_jax_peak']:.0%} of JAX's peak, transformers at "
    f"{rows['a_hf_fraction_of_torch_peak']:.0%} of torch's"
  )
  print(
    f"(b) res.{SITE_LAYER} extraction: ours {rows['b_ours_tokens_per_s']:.0f} tok/s, "
    f"transformers full forward + hook {rows['b_hf_tokens_per_s']:.0f} tok/s, ratio {rows['b_ratio']:.2f}x "
    f"(peak +{mem_ours_site:.2f} / +{mem_hf_full:.2f} GiB)"
  )
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
