"""One shard of the store: buffered, bucket-shuffled, ledgered writes of activations and traces.

Rows of `bucket_batches` consecutive global batches form a write bucket; the bucket is
permuted with `default_rng([seed, shard, bucket])` and appended to every array of the shard
with tensorstore's asynchronous writes. After the arrays are written the ledger is rewritten:
rows committed, batches done, running statistics. On resume the arrays are trimmed back to
the ledger, so a half-written bucket disappears and is written again identically.

A bucket's shuffle, statistics and conversion to the stored dtype are cut into pieces of
PIECE_ROWS rows run on `workers` threads (extract.workers; parallel/workers.py): the bytes written
and the ledger's sums are the same at any count.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from scope_jax.activations.store import KV, LEDGER, TRACE_COLUMNS, StoreError, open_array, shard_key
from scope_jax.parallel.workers import WorkerPool, resolve_workers, row_pieces


class NonFiniteActivations(ValueError):
  """Activations with NaN or Inf; the message names the site, document and position."""


PIECE_ROWS = 4_096  # rows per piece of a bucket's work: fixed, so the sums do not depend on the worker count


class ShardWriter:
  def __init__(
    self,
    kv: KV,
    shard: int,
    sites: list[str],
    widths: dict[str, int],
    dtype: str,
    chunk_rows: int,
    seed: int,
    workers: int = 0,
  ):
    self.kv, self.shard, self.sites, self.seed, self.chunk_rows = kv, shard, sites, seed, chunk_rows
    self.pool = WorkerPool(resolve_workers(workers, "extract.workers"), name=f"store writer {shard}")
    self.key = shard_key(shard)
    self.ledger = kv.read_json(f"{self.key}/{LEDGER}") or {
      "rows": 0,
      "batches": 0,
      "buckets": 0,
      "finished": False,
      "stats": {s: {"count": 0, "sum": [0.0] * widths[s], "sum_sq_norm": 0.0} for s in sites},
    }
    create = not self.ledger["finished"]
    self.arrays = {s: open_array(kv.spec, f"{self.key}/{s}", widths[s], dtype, chunk_rows, create) for s in sites}
    self.arrays["trace"] = open_array(kv.spec, f"{self.key}/trace", len(TRACE_COLUMNS), "int32", chunk_rows, create)
    self._dtype = {s: self.arrays[s].dtype.numpy_dtype for s in sites}
    self._buffer: dict[str, list[np.ndarray]] = {k: [] for k in self.arrays}
    self._sums = {s: np.asarray(self.ledger["stats"][s]["sum"], np.float64) for s in sites}

  def rewind(self, batches: int) -> None:
    """Goes back to the flush that ended at `batches` (the ledger's last or the one before; hosts
    flush at the same batches, so after a crash they differ by one flush at most) and drops the
    rows written after it."""
    if self.ledger["batches"] != batches:
      previous = self.ledger.get("previous")
      if not previous or previous["batches"] != batches:
        raise StoreError(
          f"{self.kv.root}/{self.key}: ledger at batch {self.ledger['batches']} cannot be "
          f"rewound to batch {batches}; start the extraction in a new store"
        )
      self.ledger = previous
      self._sums = {s: np.asarray(self.ledger["stats"][s]["sum"], np.float64) for s in self.sites}
    rows = self.ledger["rows"]
    resized = {
      k: a.resize(exclusive_max=[rows, None], shrink_only=True) for k, a in self.arrays.items() if a.shape[0] > rows
    }
    self.arrays.update({k: f.result() for k, f in resized.items()})

  def verify(self, chunks_in_flight: int = 64) -> None:
    """Re-reads every committed row (each chunk's CRC-32C is checked as it is read), so a chunk
    damaged since it was written is found before a resume seals it into the finished store.
    Reads `chunks_in_flight` chunks at a time; this costs one read of the shard per resume."""
    rows, step = self.ledger["rows"], self.chunk_rows
    for key, array in self.arrays.items():
      for first in range(0, rows, step * chunks_in_flight):
        starts = range(first, min(first + step * chunks_in_flight, rows), step)
        reads = [(lo, array[lo : min(lo + step, rows)].read()) for lo in starts]
        for lo, read in reads:
          try:
            read.result()
          except Exception as e:
            raise StoreError(
              f"{self.kv.root}: shard {self.shard} site {key} chunk {lo // step} (rows {lo}..) "
              f"is damaged ({e}); it was committed earlier, so start the extraction in a new store"
            ) from e

  def add(self, acts: dict[str, np.ndarray], trace: np.ndarray) -> None:
    """Buffers the rows of one batch: `acts[site] [n, width]`, `trace [n, 5]`."""
    for site in self.sites:
      rows = acts[site]
      pieces = [functools.partial(_nonfinite, rows[lo:hi]) for lo, hi in _pieces(rows)]
      bad = np.concatenate([np.zeros(0, bool), *self.pool.run(pieces)])  # a shard may get no rows of a batch
      if bad.any():
        row = int(np.argmax(bad))
        t = dict(zip(TRACE_COLUMNS, trace[row].tolist()))
        raise NonFiniteActivations(
          f"{int(bad.sum())} rows of site {site} hold NaN or Inf; the first: document {t['doc']}, "
          f"position {t['pos']} (sequence {t['seq']}, column {t['col']}, token {t['token']}). "
          f"Nothing of this bucket was written; the store keeps {self.ledger['rows']} committed rows"
        )
      self._buffer[site].append(acts[site])
    self._buffer["trace"].append(trace)

  def flush(self, batches_done: int, finished: bool = False) -> int:
    """Shuffles the buffered rows, writes them, then the ledger; returns rows written."""
    previous = json.loads(json.dumps({k: v for k, v in self.ledger.items() if k != "previous"}))
    rows = previous["rows"]
    n = sum(len(t) for t in self._buffer["trace"])
    stats = {s: dict(v) for s, v in previous["stats"].items()}
    if n:
      order = np.random.default_rng([self.seed, self.shard, previous["buckets"]]).permutation(n)
      resized = {k: a.resize(exclusive_max=[rows + n, None], expand_only=True) for k, a in self.arrays.items()}
      self.arrays = {k: f.result() for k, f in resized.items()}
      writes = []
      for key, parts in self._buffer.items():
        if key == "trace":
          block = np.concatenate(parts)[order]
        else:
          block, piece_sums = self._shuffled(parts, order, self._dtype[key])
          for row_sum, _ in piece_sums:
            self._sums[key] += row_sum
          stats[key] = {
            "count": stats[key]["count"] + n,
            "sum": self._sums[key].tolist(),
            "sum_sq_norm": stats[key]["sum_sq_norm"] + sum(sq for _, sq in piece_sums),
          }
        writes.append(self.arrays[key][rows : rows + n].write(block))
      try:
        for w in writes:
          w.result()
      except Exception as e:
        raise StoreError(f"{self.kv.root}/{self.key}: writing rows [{rows}, {rows + n}) failed ({e})") from e
    self.ledger = {
      **previous,
      "rows": rows + n,
      "batches": batches_done,
      "finished": finished,
      "stats": stats,
      "buckets": previous["buckets"] + (1 if n else 0),
      "previous": previous,
    }
    self.kv.write_json(f"{self.key}/{LEDGER}", self.ledger)
    self._buffer = {k: [] for k in self.arrays}
    return n

  def _shuffled(self, parts: list[np.ndarray], order: np.ndarray, dtype) -> tuple[np.ndarray, list]:
    """The buffered rows of one site in the bucket's `order`, as `dtype`, and per piece of
    PIECE_ROWS rows their float64 column sums and squared norm (pieces made on the pool)."""
    ends = np.cumsum([len(p) for p in parts])
    rows_nd = np.empty((int(ends[-1]), parts[0].shape[1]), parts[0].dtype)
    self.pool.run([functools.partial(np.copyto, rows_nd[e - len(p) : e], p) for p, e in zip(parts, ends)])
    block = np.empty(rows_nd.shape, dtype)

    def piece(lo: int, hi: int) -> tuple[np.ndarray, float]:
      shuffled = rows_nd[order[lo:hi]]
      block[lo:hi] = shuffled
      return shuffled.sum(axis=0, dtype=np.float64), float(np.sum(np.square(shuffled, dtype=np.float64)))

    return block, self.pool.run([functools.partial(piece, lo, hi) for lo, hi in _pieces(rows_nd)])

  def close(self) -> None:
    """Ends the writer's worker threads."""
    self.pool.close()


def _pieces(rows_nd: np.ndarray) -> list[tuple[int, int]]:
  return row_pieces(len(rows_nd), PIECE_ROWS)


def _nonfinite(rows_nd: np.ndarray) -> np.ndarray:
  """[rows] True where a row holds NaN or Inf."""
  return ~np.isfinite(rows_nd).all(axis=1)


def ledger_batches(kv: KV, shards: int) -> list[int]:
  """Batches done per shard (0 for a shard that has no ledger yet)."""
  return [(kv.read_json(f"{shard_key(k)}/{LEDGER}") or {"batches": 0})["batches"] for k in range(shards)]
