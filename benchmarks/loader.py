"""The data path's throughput with 1 and 2 worker threads (data.workers, extract.workers): the
shuffle loader from a local store and the store writer's buckets, beside the raw read bandwidth
of the same chunk files and beside the feed each Gemma 2 preset's trainer jobs need at Gemma
Scope's MFU on one 8-GPU H100 host, all in the same run.

Run: PYTHONPATH=. python -m benchmarks.loader [--small]
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from scope_jax.activations.store import KV, write_manifest
from scope_jax.activations.writer import ShardWriter
from scope_jax.data.loader import StoreLoader
from scope_jax.parallel.devices import target
from scope_jax.parallel.mesh import make_mesh, use_xnnpack_on_cpu
from scope_jax.parallel.workers import host_cores

REPO = Path(__file__).resolve().parents[1]
SITE, CHUNK, BATCH = "res.12", 1_024, 4_096
FULL = dict(d=2_304, rows=65_536, bucket=32_768, repeats=3)  # Gemma 2 2B's width
SMALL = dict(d=64, rows=8_192, bucket=4_096, repeats=1)


def write_rows(root: str, batches: list[np.ndarray], workers: int, dtype: str = "float32") -> float:
  """Writes a store of `batches` (one write bucket each) through the writer; returns its seconds
  (add + flush)."""
  kv, d = KV(root), batches[0].shape[1]
  writer = ShardWriter(kv, 0, [SITE], {SITE: d}, dtype, CHUNK, seed=0, workers=workers)
  trace = np.zeros((len(batches[0]), 5), np.int32)
  start = time.perf_counter()
  for i, batch in enumerate(batches):
    writer.add({SITE: batch}, trace)
    writer.flush(i + 1, finished=i + 1 == len(batches))
  seconds = time.perf_counter() - start
  writer.close()
  identity = {"sites": [SITE], "widths": {SITE: d}, "chunk_rows": CHUNK, "dtype": dtype}
  write_manifest(kv, {**identity, "seq_len": 1024, "text": ["random normal"], "model": "none"}, 1)
  return seconds


def raw_read_bytes_per_s(root: str) -> float:
  files = sorted(p for p in (Path(root) / "shards" / "00000" / SITE / "c").rglob("*") if p.is_file())
  start, total = time.perf_counter(), 0
  for p in files:
    with open(p, "rb") as f:
      total += len(f.read())
  return total / (time.perf_counter() - start)


def copy_gb_per_s(threads: int, mb: int = 256) -> float:
  """A plain numpy copy's bandwidth on `threads` threads (each copying its own `mb` MB): the memory
  bound the loader's 2-over-1 ratio stands beside."""
  src = [np.ones(mb * 2**18, np.float32) for _ in range(threads)]
  dst = [np.zeros_like(x) for x in src]
  with ThreadPoolExecutor(threads) as pool:
    best = min(_timed(lambda: list(pool.map(np.copyto, dst, src))) for _ in range(5))
  return threads * mb * 2**20 / best / 1e9


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def loader_rows_per_s(root: str, rows: int, workers: int, batch: int = BATCH) -> float:
  """Rows/s of an epoch of batches onto the first device, in the steady state of a long job: after
  an untimed epoch, in which the threads start and the loader's buffers are first taken (fresh
  memory, a page fault per 4 KiB; later windows and batches reuse them)."""
  loader = StoreLoader(root, SITE, batch, make_mesh(devices=jax.devices()[:1]), seed=0, workers=workers)
  steps = rows // batch
  for s in range(steps):
    loader.batch(s).x_bd.block_until_ready()
  start = time.perf_counter()
  for s in range(steps, 2 * steps):
    loader.batch(s).x_bd.block_until_ready()
  seconds = time.perf_counter() - start
  loader.close()
  return steps * batch / seconds


def preset_feeds(slice_name: str = "h100x8") -> dict:
  """Per Gemma 2 preset: the largest feed (rows/s, GB/s) among its trainer jobs on `slice_name`
  at Gemma Scope's MFU, at the float32 and the bfloat16 peak."""
  from scope_jax import grid
  from scope_jax.train.plan import train_feed

  spec = importlib.util.spec_from_file_location("gemma2_presets", REPO / "configs" / "gemma2.py")
  presets = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(presets)
  slice_, out = target(slice_name), {}
  for size in ("2b", "9b", "27b"):
    with tempfile.TemporaryDirectory() as workdir:
      jobs = [j for j in grid.plan(presets.get_config(f"size={size}"), workdir) if j.stage == "train"]
    for precision in ("float32", "bfloat16"):
      feeds = {j.name: train_feed(j.config, slice_, precision) for j in jobs}
      name = max(feeds, key=lambda n: feeds[n][0] * feeds[n][1])
      rows_per_s, row_bytes = feeds[name]
      out[f"{size} {precision}"] = {"job": name, "rows_per_s": rows_per_s, "gb_per_s": rows_per_s * row_bytes / 1e9}
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true", help="tiny shapes (the suite runs this)")
  shape = SMALL if parser.parse_args().small else FULL
  d, rows, bucket, repeats = shape["d"], shape["rows"], shape["bucket"], shape["repeats"]
  use_xnnpack_on_cpu()
  row_bytes = 4 * d
  batches = [np.random.default_rng(i).standard_normal((bucket, d), np.float32) for i in range(rows // bucket)]
  writes, loads = {}, {}  # seconds per measurement; 1 and 2 workers alternate so drift hits both
  with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
    for rep in range(repeats):
      for workers in (1, 2):
        for dtype in ("float32", "bfloat16"):
          seconds = write_rows(f"{tmp}/w{rep}-{workers}-{dtype}", batches, workers, dtype)
          writes.setdefault(f"{workers} {dtype}", []).append(seconds)
          shutil.rmtree(f"{tmp}/w{rep}-{workers}-{dtype}")
    root = f"{tmp}/store"
    write_rows(root, batches, workers=2)
    raw = raw_read_bytes_per_s(root) / 1e9  # the page cache holds the files in every reading
    for _ in range(repeats):
      for workers in (1, 2):
        loads.setdefault(str(workers), []).append(loader_rows_per_s(root, rows, workers))
  r = {"d": d, "rows": rows, "host_cores": host_cores(), "raw_read_gb_per_s": raw, "loader": {}, "writer": {}}
  for key, seconds in writes.items():
    per_s = rows / statistics.median(seconds)
    r["writer"][key] = {"rows_per_s": per_s, "gb_per_s": per_s * row_bytes / 1e9}
  for key, rates in loads.items():
    per_s = statistics.median(rates)
    r["loader"][key] = {"rows_per_s": per_s, "gb_per_s": per_s * row_bytes / 1e9}
  r["loader_2_over_1"] = r["loader"]["2"]["rows_per_s"] / r["loader"]["1"]["rows_per_s"]
  r["copy_gb_per_s"] = {str(t): copy_gb_per_s(t, 256 if shape is FULL else 8) for t in (1, 2)}
  r["copy_2_over_1"] = r["copy_gb_per_s"]["2"] / r["copy_gb_per_s"]["1"]
  r["writer_2_over_1"] = r["writer"]["2 float32"]["rows_per_s"] / r["writer"]["1 float32"]["rows_per_s"]
  r["feeds_h100x8"] = preset_feeds()
  for workers in ("1", "2"):
    x = r["loader"][workers]
    print(
      f"loader, {workers} worker(s): {x['rows_per_s']:,.0f} rows/s = {x['gb_per_s']:.2f} GB/s at d {d} "
      f"({x['gb_per_s'] / r['raw_read_gb_per_s']:.0%} of raw reads, {r['raw_read_gb_per_s']:.2f} GB/s)"
    )
  for key, x in r["writer"].items():
    print(f"writer, {key.replace(' ', ' worker(s), ')} store: {x['rows_per_s']:,.0f} rows/s = {x['gb_per_s']:.2f} GB/s")
  print(
    f"2 workers / 1: loader {r['loader_2_over_1']:.2f}x, writer {r['writer_2_over_1']:.2f}x ({r['host_cores']} cores); "
    f"a plain copy {r['copy_2_over_1']:.2f}x ({r['copy_gb_per_s']['1']:.1f} -> {r['copy_gb_per_s']['2']:.1f} GB/s)"
  )
  for key, f in r["feeds_h100x8"].items():
    have = r["loader"]["2"]["gb_per_s"]
    print(
      f"feed of gemma2 {key} ({f['job']}) on h100x8 at 50.8% MFU: {f['rows_per_s']:,.0f} rows/s = "
      f"{f['gb_per_s']:.2f} GB/s; this host's loader gives {have / f['gb_per_s']:.2f}x that"
    )
  print(json.dumps(r))


if __name__ == "__main__":
  main()
