"""The local run's training step (configs/local.py: six SAEs, widths 1,024 and 2,048, d 640,
batches of 1,024 rows, gradients clipped), as `scope-jax train` builds it on this machine's CPU
(one device, XNNPACK), three ways in one process:

- clipped, the blocks' gradients kept between the norm pass and the update (what runs now);
- clipped, the gradients formed again in the update (what runs where one SAE's gradient does not
  fit the tiling's budget, train/tiling.py, and what ran before);
- unclipped (`recipe.clip_grad_norm = 0`): the bound the clipped step approaches.

Each figure is the median of five timed steps after a compile and a warm-up step. The last line
printed is one JSON object.

Run: PYTHONPATH=. python -m benchmarks.local_step
"""

import json
import os

import jax
import numpy as np

from benchmarks.common import seconds_per_call
from benchmarks.sae_step import gradients_formed_again
from configs.local import get_config
from scope_jax.data.batch import Batch
from scope_jax.parallel.mesh import make_mesh, use_xnnpack_on_cpu
from scope_jax.train import run, stacked

D = 640  # Gemma 3 270M's d_model (res.6)


def step_seconds(clip: float, repeats: int = 5) -> float:
  config = get_config()
  config.recipe.clip_grad_norm = clip
  sweep = stacked.sweep_from(config)
  built = run.build(sweep, make_mesh(devices=jax.devices()[:1]), np.zeros(D, np.float32))
  rows = Batch(jax.device_put(np.random.default_rng(0).normal(0, 1, (sweep.batch_size, D)).astype(np.float32)))
  state = built.init()
  compiled = built.make_step(()).lower(state, rows).compile()
  box = [compiled(state, rows)[0]]

  def one_step():
    box[0], _ = compiled(box[0], rows)
    jax.block_until_ready(box[0])

  seconds, _ = seconds_per_call(one_step, repeats=repeats)
  return seconds


def main():
  use_xnnpack_on_cpu()
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}")
  clip = get_config().recipe.clip_grad_norm
  kept = step_seconds(clip)
  with gradients_formed_again():
    formed = step_seconds(clip)
  plain = step_seconds(0.0)
  figures = {
    "clipped_kept_s": kept,
    "clipped_formed_again_s": formed,
    "unclipped_s": plain,
    "kept_vs_formed_again": kept / formed,
    "kept_vs_unclipped": kept / plain,
    "formed_again_vs_unclipped": formed / plain,
  }
  print(
    f"local step (6 SAEs, B 1,024): clipped, gradients kept {kept:.3f}s ({kept / plain:.2f}x unclipped); "
    f"formed again {formed:.3f}s ({formed / plain:.2f}x); unclipped {plain:.3f}s; kept / formed again "
    f"{kept / formed:.2f}"
  )
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
