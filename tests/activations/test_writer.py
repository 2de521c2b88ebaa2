"""The store writer's worker pool: any worker count writes the same bytes and the same ledger."""

import json

import numpy as np
import pytest
import tensorstore as ts

from scope_jax.activations.store import KV
from scope_jax.activations.writer import PIECE_ROWS, ShardWriter
from tests.helpers import tree_hashes

WIDTH, BATCH_ROWS = 24, 3_000  # a bucket of three batches spans several pieces of PIECE_ROWS rows


def write_shard(root, dtype: str, workers: int, rows_nd: np.ndarray) -> dict:
  writer = ShardWriter(KV(str(root)), 0, ["res.0"], {"res.0": WIDTH}, dtype, 512, seed=7, workers=workers)
  for b, lo in enumerate(range(0, len(rows_nd), BATCH_ROWS)):
    batch = rows_nd[lo : lo + BATCH_ROWS]
    writer.add({"res.0": batch}, np.zeros((len(batch), 5), np.int32))
    writer.add({"res.0": batch[:0]}, np.zeros((0, 5), np.int32))  # a batch of only padding for this shard
    if b % 3 == 2:
      writer.flush(b + 1)
  writer.flush(len(rows_nd) // BATCH_ROWS, finished=True)
  writer.close()
  return writer.ledger


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_worker_count_writes_the_same_bytes_and_sums(tmp_path, dtype):
  rows_nd = np.random.default_rng(0).normal(3.0, 2.0, (4 * 3 * BATCH_ROWS, WIDTH)).astype(np.float32)
  assert 3 * BATCH_ROWS > 2 * PIECE_ROWS
  ledgers = {w: write_shard(tmp_path / f"w{w}", dtype, w, rows_nd) for w in (1, 3)}
  assert json.dumps(ledgers[1]) == json.dumps(ledgers[3])
  assert tree_hashes(tmp_path / "w1") == tree_hashes(tmp_path / "w3")
  stats = ledgers[3]["stats"]["res.0"]  # against numpy over the rows as given
  np.testing.assert_allclose(stats["sum"], rows_nd.sum(axis=0, dtype=np.float64), rtol=1e-12)
  np.testing.assert_allclose(stats["sum_sq_norm"], np.sum(np.square(rows_nd, dtype=np.float64)), rtol=1e-12)
  stored = ts.open(
    {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "w3/shards/00000/res.0/")}}
  ).result()
  stored_nd = np.asarray(stored.read().result(), np.float32)
  first_bucket = rows_nd[: 3 * BATCH_ROWS]
  order = np.random.default_rng([7, 0, 0]).permutation(len(first_bucket))
  np.testing.assert_array_equal(stored_nd[: len(first_bucket)], first_bucket[order].astype(dtype).astype(np.float32))
