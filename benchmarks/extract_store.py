"""Extraction throughput on Gemma 3 270M (res.6, batches of 8 × 128 tokens, float32): with the
store writing, beside the same forward passes without writing, and beside the disk's raw
sequential write bandwidth for the same bytes (numpy, fsync), all in the same run.

Run: PYTHONPATH=. python -m benchmarks.extract_store
"""

import json
import os
import tempfile
import time

import numpy as np

import scope_jax as sj
from scope_jax.activations.extract import extract, kept_documents
from scope_jax.activations.sequences import batches, sequences
from scope_jax.config import default_config
from scope_jax.parallel.mesh import use_xnnpack_on_cpu

TOKENS = 30_000


def config(store: str):
  c = default_config()
  c.model, c.sites = "gemma3-270m", ("res.6",)
  c.extract.seq_len, c.extract.batch_size, c.extract.tokens = 128, 8, TOKENS
  c.extract.bucket_rows, c.extract.chunk_rows, c.extract.store = 4_096, 512, store  # flushes overlap the forward
  return c


def main():
  use_xnnpack_on_cpu()
  lm = sj.load_model("gemma3-270m")
  with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:
    c = config(os.path.join(root, "store"))
    all_batches = list(batches(sequences(kept_documents(c), lm.tokenizer, 128, "pack"), 8, lm.tokenizer.pad_id,
                               max_batches=-(-TOKENS // (8 * 127))))
    lm.activations(all_batches[0].tokens, ["res.6"])["res.6"].block_until_ready()  # compile
    start = time.perf_counter()
    kept = 0
    for b in all_batches:
      act = np.asarray(lm.activations(b.tokens, ["res.6"])["res.6"])
      kept += int(b.keep.sum())
    forward_only = kept / (time.perf_counter() - start)
    summary = extract(c, root, lm=lm, progress=False)
    with_writing = summary["tokens_processed"] / summary["seconds"]
    data = np.random.default_rng(0).standard_normal((summary["rows"], 640), np.float32)
    start = time.perf_counter()
    with open(os.path.join(root, "raw.bin"), "wb") as f:
      f.write(data.tobytes())
      f.flush()
      os.fsync(f.fileno())
    raw = data.nbytes / (time.perf_counter() - start)
  store_mb_per_s = with_writing * 640 * 4 / 1e6
  r = {"tokens_per_s_with_writing": with_writing, "tokens_per_s_forward_only": forward_only,
       "ratio": with_writing / forward_only, "store_write_mb_per_s": store_mb_per_s,
       "raw_write_mb_per_s": raw / 1e6}
  print(f"extraction {with_writing:,.0f} tok/s with writing vs {forward_only:,.0f} tok/s forward only "
        f"({r['ratio']:.2f}x); store writes {store_mb_per_s:.1f} MB/s, the disk takes {raw / 1e6:,.0f} MB/s raw")
  print(json.dumps(r))
  del act


if __name__ == "__main__":
  main()
