"""Loader throughput from a local store, beside the raw read bandwidth of the same chunk files
(plain file reads, same process, same run) and beside what the SAE trainer consumes at
d = 640, M = 16,384, batch 4,096 (measured here with one trainer step).

Run: PYTHONPATH=. python -m benchmarks.loader
"""

import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import seconds_per_call
from scope_jax.activations.store import KV, write_manifest
from scope_jax.activations.writer import ShardWriter
from scope_jax.data.loader import StoreLoader
from scope_jax.parallel.mesh import make_mesh, use_xnnpack_on_cpu
from scope_jax.train import stacked

D, ROWS, CHUNK, BATCH, M = 640, 131_072, 1_024, 4_096, 16_384


def make_store(root: str) -> None:
  kv = KV(root)
  writer = ShardWriter(kv, 0, ["res.6"], {"res.6": D}, "float32", CHUNK, seed=0)
  rng = np.random.default_rng(0)
  for lo in range(0, ROWS, 16_384):
    writer.add({"res.6": rng.standard_normal((16_384, D), np.float32)}, np.zeros((16_384, 5), np.int32))
    writer.flush(lo // 16_384 + 1, finished=lo + 16_384 >= ROWS)
  write_manifest(kv, {"sites": ["res.6"], "widths": {"res.6": D}, "chunk_rows": CHUNK}, 1)


def raw_read_bytes_per_s(root: str) -> float:
  files = sorted(p for p in (Path(root) / "shards" / "00000" / "res.6" / "c").rglob("*") if p.is_file())
  start, total = time.perf_counter(), 0
  for p in files:
    with open(p, "rb") as f:
      total += len(f.read())
  return total / (time.perf_counter() - start)


def loader_rows_per_s(root: str) -> float:
  loader = StoreLoader(root, "res.6", BATCH, make_mesh(devices=jax.devices()[:1]), seed=0)
  steps = ROWS // BATCH
  loader.batch(0).block_until_ready()
  start = time.perf_counter()
  for s in range(1, steps):
    loader.batch(s).block_until_ready()
  seconds = time.perf_counter() - start
  loader.close()
  return (steps - 1) * BATCH / seconds


def trainer_tokens_per_s() -> float:
  mesh = make_mesh(devices=jax.devices()[:1])
  init, _, step_fn = stacked.build(0, np.zeros(D), stacked.make_groups([M], [6e-4]), stacked.Recipe(), mesh, BATCH)
  box = [init()]
  x = jax.device_put(np.random.default_rng(0).standard_normal((BATCH, D), np.float32) / np.sqrt(D))

  def run():
    box[0], _ = step_fn(box[0], x)
    jax.block_until_ready(box[0])

  seconds, _ = seconds_per_call(run, repeats=3)
  return BATCH / seconds


def main():
  use_xnnpack_on_cpu()
  with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:
    make_store(root)
    raw = raw_read_bytes_per_s(root)  # the OS page cache holds the files in both readings
    rows = loader_rows_per_s(root)
    train = trainer_tokens_per_s()
  bytes_per_row = D * 4
  r = {
    "loader_rows_per_s": rows,
    "loader_mb_per_s": rows * bytes_per_row / 1e6,
    "raw_read_mb_per_s": raw / 1e6,
    "fraction_of_raw": rows * bytes_per_row / raw,
    "trainer_rows_per_s": train,
    "ratio_vs_trainer": rows / train,
  }
  print(
    f"loader {rows:,.0f} rows/s = {r['loader_mb_per_s']:,.0f} MB/s; raw reads of the same files "
    f"{r['raw_read_mb_per_s']:,.0f} MB/s ({r['fraction_of_raw']:.0%}); trainer consumes {train:,.0f} rows/s "
    f"at d={D}, M={M}, batch {BATCH} ({r['ratio_vs_trainer']:.1f}x)"
  )
  print(json.dumps(r))


if __name__ == "__main__":
  main()
