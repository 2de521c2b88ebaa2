"""One command for a device: on whatever backend JAX finds, on its first device,

- the training step at Gemma Scope's shapes (d 2,304 and 3,584; M 16,384 and 131,072; B 4,096),
  dense and sparse, float32 and bfloat16 precision, from a trained-like state (L0 ≈ 64,
  benchmarks/sae_step.py) as MFU: 12·B·d·M FLOPs per step (Gemma Scope's convention, so a step
  that keeps pre-activations and skips 2·B·d·M is credited with them) over the device's peak for
  that precision (the table in scope_jax/parallel/devices.py; on a CPU, the plain matmul of the
  step's own shape measured in the same run), and beside Gemma Scope's 50.8%;
- the loader's feed ratio: the loader's seconds per batch of the step's d from a local store over
  the step's seconds (below 1: the loader keeps up, one host feeding one chip);
- extraction on a 4-layer random Gemma 2 2B-width model: tokens/s of the forward to the last
  layer's residual (activations copied to the host, as extraction does) and of the store writer
  at that width; extraction runs them overlapped, so the slower bounds it;
- the eval engine on that model: seconds for 6 SAEs at one site over its lower bound (one forward
  to the site plus one from it per SAE and reference, the same compiled programs).

`--small` runs every part at shapes a 2-core CPU does in a minute (the suite runs it so it cannot
rot). The last line printed is one JSON object.

Run: python -m benchmarks.device [--small]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import seconds_per_call
from benchmarks.eval_engine import lower_bound as eval_lower_bound
from benchmarks.loader import loader_rows_per_s, write_rows
from benchmarks.sae_step import ours, slots_per_token, trained_like
from scope_jax.eval.evaluate import evaluate_saes
from scope_jax.models.config import PRESETS, alternating_layer_types
from scope_jax.models.gemma import Gemma
from scope_jax.models.lm import LanguageModel, place_parameters
from scope_jax.parallel import precision as precision_lib
from scope_jax.parallel.devices import kind_of
from scope_jax.parallel.mesh import make_mesh, use_xnnpack_on_cpu
from scope_jax.sae import fold, init_sae
from scope_jax.train.plan import GEMMA_SCOPE_MFU
from scope_jax.train.selection import auto_capacity

FULL = dict(
  steps=[(d, m, 4_096) for d in (2_304, 3_584) for m in (16_384, 131_072)],
  model=dataclasses.replace(PRESETS["gemma2-2b"], n_layers=4, layer_types=alternating_layer_types(4, 2)),
  tokens=(8, 1_024),  # sequences × tokens per forward
  eval_batches=2,
)
SMALL = dict(
  steps=[(64, 1_024, 256)],
  model=dataclasses.replace(
    FULL["model"], d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128, vocab_size=4_096
  ),
  tokens=(2, 64),
  eval_batches=2,
)
PRECISIONS = ("float32", "bfloat16")
EVAL_SAES = 6


def matmul_flops_per_s(d: int, m: int, batch: int, precision: str) -> float:
  """FLOP/s of the step's own `[batch, d] @ [d, M]` through the project's matmul at `precision`."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((batch, d), np.float32))
  b = jnp.asarray(np.random.default_rng(1).standard_normal((d, m), np.float32))
  fn = jax.jit(precision_lib.at_precision(precision, precision_lib.matmul))
  seconds, _ = seconds_per_call(lambda: fn(a, b).block_until_ready(), repeats=5)
  return 2 * batch * d * m / seconds


def peak_flops(precision: str, d: int, m: int, batch: int) -> tuple[float, str]:
  """(the device's peak FLOP/s at `precision`, where the figure comes from)."""
  kind = kind_of(jax.devices()[0])
  if kind is not None:
    return (kind.bf16_flops if precision == "bfloat16" else kind.f32_flops), f"{kind.name} table"
  return matmul_flops_per_s(d, m, batch, precision), "measured matmul of the step's shape"


def step_figures(d: int, m: int, batch: int, loader_s_per_batch: float) -> list[dict]:
  """MFU of the dense and sparse steps at both precisions, with the loader's feed ratio."""
  start = trained_like(d, m, batch)
  capacity = auto_capacity(int(slots_per_token(*start).max()), m)
  repeats = 2 if m > 65_536 else 3
  out = []
  for precision in PRECISIONS:
    peak, source = peak_flops(precision, d, m, batch)
    for step, cap in (("dense", 0), ("sparse", capacity)):
      seconds, peak_bytes, _ = ours(d, m, batch, repeats=repeats, start=start, capacity=cap, precision=precision)
      mfu = 12 * batch * d * m / seconds / peak
      out.append(
        {
          "d": d,
          "M": m,
          "batch": batch,
          "step": step,
          "precision": precision,
          "capacity": cap,
          "step_s": seconds,
          "tokens_per_s": batch / seconds,
          "mfu": mfu,
          "mfu_over_gemma_scope": mfu / GEMMA_SCOPE_MFU,
          "peak_flops": peak,
          "peak_source": source,
          "compiled_peak_gib": peak_bytes / 2**30,
          "loader_feed_ratio": loader_s_per_batch / seconds,
        }
      )
      print(
        f"step d {d} M {m} B {batch} {step:6s} {precision:8s}: {1e3 * seconds:8.1f} ms, MFU {mfu:6.1%} "
        f"({mfu / GEMMA_SCOPE_MFU:.2f}x Gemma Scope's 50.8%; peak {peak / 1e12:.1f} TFLOP/s, {source}); "
        f"loader / step {loader_s_per_batch / seconds:.2f}"
      )
  return out


def loader_seconds_per_batch(d: int, batch: int, tmp: str) -> float:
  """The loader's seconds per `batch`-row batch of width d from a local store of 8 batches."""
  root = f"{tmp}/store-{d}"
  rng = np.random.default_rng(0)
  write_rows(root, [rng.standard_normal((batch, d), np.float32) for _ in range(8)], workers=0)
  return batch / loader_rows_per_s(root, 8 * batch, workers=0, batch=batch)


def random_model(config) -> LanguageModel:
  """The architecture with normal(0, 0.02) weights on the first device (speed does not depend on them)."""
  mesh = make_mesh(devices=jax.devices()[:1])
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Gemma(config))))
  rng = np.random.default_rng(0)

  def read(keys):
    shape = shapes
    for k in keys:
      shape = shape[k]
    return (0.02 * rng.standard_normal(shape.shape)).astype(np.float32)

  return LanguageModel(place_parameters(config, read, mesh, jnp.float32), mesh, None, "random")


def extraction_figures(config, tokens_shape: tuple[int, int], tmp: str) -> tuple[dict, LanguageModel, str, np.ndarray]:
  """(figures, the model, its site, a batch of tokens) for extraction at the model's last layer."""
  lm = random_model(config)
  site = f"res.{config.n_layers - 1}"
  tokens = np.random.default_rng(0).integers(4, config.vocab_size, tokens_shape).astype(np.int32)
  tokens[:, 0] = 2

  def forward():
    np.asarray(lm.activations(tokens, [site])[site])

  seconds, _ = seconds_per_call(forward, repeats=3)
  rows = tokens.size
  acts = np.asarray(lm.activations(tokens, [site])[site]).reshape(rows, -1)
  write_s = min(write_rows(f"{tmp}/extract-{i}", [acts] * 4, workers=0) for i in range(2)) / 4
  out = {
    "model": f"gemma2-2b width, {config.n_layers} layers, random",
    "site": site,
    "tokens_per_forward": rows,
    "forward_tokens_per_s": rows / seconds,
    "writer_tokens_per_s": rows / write_s,
  }
  out["extraction_tokens_per_s"] = min(out["forward_tokens_per_s"], out["writer_tokens_per_s"])
  print(
    f"extraction at {site} of a {config.n_layers}-layer model of d {config.d_model}: forward "
    f"{out['forward_tokens_per_s']:,.0f} tok/s, store writer {out['writer_tokens_per_s']:,.0f} tok/s"
  )
  return out, lm, site, tokens


@dataclasses.dataclass
class TokenBatch:  # what evaluate_saes reads of a text batch
  tokens: np.ndarray
  keep: np.ndarray


def eval_figures(lm, site: str, tokens: np.ndarray, n_batches: int) -> dict:
  d = lm.config.d_model
  saes = {f"w{4 * d}-{i}": (fold(init_sae(jax.random.key(i), d, 4 * d), 1.0 + i), site) for i in range(EVAL_SAES)}
  batches = [TokenBatch(tokens, np.ones(tokens.shape, bool)) for _ in range(n_batches)]
  engine, bound = [], []
  for _ in range(2):  # the first of each compiles
    start = time.perf_counter()
    evaluate_saes(lm, saes, batches, progress=False)
    engine.append(time.perf_counter() - start)
    bound.append(eval_lower_bound(lm, batches, EVAL_SAES + 3, site))
  engine, bound = engine[-1], bound[-1]
  print(f"eval engine, {EVAL_SAES} SAEs at {site}: {engine:.2f} s = {engine / bound:.2f}x its lower bound")
  return {
    "saes": EVAL_SAES,
    "site": site,
    "engine_s": engine,
    "lower_bound_s": bound,
    "engine_over_bound": engine / bound,
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true", help="tiny shapes (the suite runs this on CPU)")
  shape = SMALL if parser.parse_args().small else FULL
  use_xnnpack_on_cpu()
  device = jax.devices()[0]
  print(f"{device.platform}: {device.device_kind}, {len(jax.devices())} devices, {os.cpu_count()} host cores")
  r = {"platform": device.platform, "device_kind": device.device_kind, "steps": []}
  with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
    loader_s = {d: loader_seconds_per_batch(d, b, tmp) for d, _, b in shape["steps"]}
    for d, m, batch in shape["steps"]:
      r["steps"].append(step_figures(d, m, batch, loader_s[d]))
    r["steps"] = [x for group in r["steps"] for x in group]
    r["extraction"], lm, site, tokens = extraction_figures(shape["model"], shape["tokens"], tmp)
  r["eval"] = eval_figures(lm, site, tokens, shape["eval_batches"])
  print(json.dumps(r))


if __name__ == "__main__":
  main()
