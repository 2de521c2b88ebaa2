"""Stores written with the store's own writer API, with rows that say who they are."""

from __future__ import annotations

import numpy as np

from scope_jax.activations.store import KV, write_manifest
from scope_jax.activations.writer import ShardWriter

SITE = "res.0"


def write_store(
  root,
  shard_rows=(1_000, 700),
  width=8,
  chunk_rows=64,
  bucket_rows=256,
  doc_rows=50,
  seed=0,
  finish=True,
  workers=0,
  dtype="float32",
) -> KV:
  """Column 0 of row r is its global id (shards in order), column 1 its document; documents are
  runs of `doc_rows` consecutive ids, as extraction sees them before its bucket shuffle."""
  kv = KV(str(root))
  identity = {
    "sites": [SITE],
    "widths": {SITE: width},
    "chunk_rows": chunk_rows,
    "dtype": dtype,
    "seq_len": 64,
    "text": ["synthetic"],
    "model": "none",
  }
  first = 0
  for process, n in enumerate(shard_rows):
    writer = ShardWriter(kv, process, [SITE], {SITE: width}, dtype, chunk_rows, seed, workers=workers)
    ids = np.arange(first, first + n)
    rows = np.zeros((n, width), np.float32)
    rows[:, 0], rows[:, 1] = ids, ids // doc_rows
    rows[:, 2:] = np.random.default_rng(process).normal(size=(n, width - 2))
    trace = np.stack([ids % 97, ids // doc_rows, ids % doc_rows, ids // 63, ids % 63], axis=1).astype(np.int32)
    for lo in range(0, n, bucket_rows):
      writer.add({SITE: rows[lo : lo + bucket_rows]}, trace[lo : lo + bucket_rows])
      writer.flush(lo // bucket_rows + 1, finished=finish and lo + bucket_rows >= n)
    first += n
  if finish:
    write_manifest(kv, identity, len(shard_rows))
  return kv
