"""The bucketed shuffle loader: per-host, deterministic, resumable batches from a finished store.

Its parts: the read order (order.py, pure: which rows make each step), the window reader
(chunks.py: reads ahead, checks), the batcher (batcher.py: host rows onto the mesh) and a
background prefetcher (parallel/prefetch.py).

Guarantees (documented in the README):
- The data is read as `streams` disjoint streams (default: one per process). Per epoch the
  store's chunks (the zarr chunks of every shard) are permuted with `default_rng([seed, epoch])`
  and dealt round-robin to the streams; within a stream's epoch every one of its rows appears
  exactly once, so every row of the store appears exactly once per epoch.
- Rows are shuffled twice: at write time within buckets (extraction), and here within windows
  of `window_chunks` consecutive chunks of a stream's permuted order (`default_rng([seed, epoch,
  stream, window])`). Memory holds about two windows per stream.
- The global batch of step s is, stream after stream, rows [s·b, (s+1)·b) of every stream
  (b = batch / streams): a pure function of (seed, streams, s). A resumed job starts at step s
  directly, and with `streams` fixed the batches do not depend on how many processes read them
  (each process reads the streams that feed its devices).
- A batch is gathered, scaled and checked by `workers` threads (data.workers; 0 = the host's
  cores), each piece one chunk's rows (parallel/workers.py): the same bytes at any count.
- A missing or corrupt chunk is an error naming shard and chunk (never zeros); rows with NaN or
  Inf are an error with counts, or with `nonfinite="skip"` are replaced by other rows of the same
  window and counted in `loader.skipped`.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scope_jax.activations.store import Store, StoreError, open_store
from scope_jax.data.batch import SiteSource
from scope_jax.data.batcher import HostBuffers
from scope_jax.data.chunks import WindowReader
from scope_jax.data.normalization import scale_and_mean
from scope_jax.data.order import StreamOrder
from scope_jax.parallel.mesh import DATA, owned_blocks
from scope_jax.parallel.prefetch import Prefetcher
from scope_jax.parallel.workers import WorkerPool, resolve_workers


class StoreLoader(SiteSource):
  """A `BatchSource` over one site of a finished store."""

  def __init__(
    self,
    root: str | Store,
    site: str,
    batch_size: int,
    mesh: Mesh,
    seed: int = 0,
    normalize: str | None = "raw",
    window_chunks: int = 16,
    prefetch: int = 2,
    nonfinite: str = "error",
    expected_width: int | None = None,
    streams: int = 0,
    workers: int = 0,
  ):
    self.store = open_store(root) if isinstance(root, str) else root
    self.site, self.seed, self.mesh = site, seed, mesh
    self.width = self.store.width(site)
    if expected_width is not None and expected_width != self.width:
      raise ValueError(
        f"store {self.store.root} site {site}: width {self.width}, but the config expects {expected_width}"
      )
    processes = jax.process_count()
    self.streams = streams or processes
    if self.streams % processes:
      raise ValueError(f"data.streams {self.streams} is not a multiple of the process count ({processes})")
    if batch_size % mesh.shape[DATA] or batch_size % self.streams:
      raise ValueError(
        f"batch_size {batch_size} is not divisible by the mesh's data axis ({mesh.shape[DATA]}) "
        f"and the number of streams ({self.streams})"
      )
    self.batch_size, self.stream_batch = batch_size, batch_size // self.streams
    self.sharding = NamedSharding(mesh, P(DATA, None))
    self.own_streams = owned_blocks(mesh, batch_size, self.streams, "data.streams")
    self.window_chunks = max(1, window_chunks)
    stats = self.store.stats(site)
    self.scale, self.divisor, self.mean = scale_and_mean(
      stats["mean_sq_norm"], stats["mean"], normalize, f"{self.store.root} site {site}"
    )
    self._divisor = np.float32(self.divisor)
    chunk_rows = self.store.chunk_rows
    # every chunk of every shard: (shard, first row in shard, rows)
    self.chunks = [
      (shard, lo, min(chunk_rows, rows - lo))
      for shard, rows in enumerate(self.store.shard_rows)
      for lo in range(0, rows, chunk_rows)
    ]
    if len(self.chunks) < self.streams:
      raise StoreError(f"{self.store.root}: {len(self.chunks)} chunks cannot feed {self.streams} streams")
    self.order = StreamOrder([c[2] for c in self.chunks], seed, self.streams, self.window_chunks)
    self.pool = WorkerPool(resolve_workers(workers, "data.workers"), name=f"loader {site} worker")
    keep = 2 * len(self.own_streams)
    self.nonfinite = nonfinite
    self.reader = WindowReader(self.store, site, self.chunks, self.order, nonfinite, keep, seed, self.pool)
    # A batch's memory is reused only once no array holds it (JAX on CPU keeps using it, zero-copy).
    self._buffers = HostBuffers(keep=prefetch + 4)
    self._prefetch = Prefetcher(self.local_rows, prefetch, name=f"loader {site}")

  @property
  def skipped(self) -> int:
    """Rows with NaN or Inf replaced so far (`nonfinite="skip"`)."""
    return self.reader.skipped

  def local_rows(self, step: int) -> np.ndarray:
    """This process's rows of step `step` (its streams' rows, in stream order), float32
    `[batch_size / processes, width]`."""
    out = self._buffers.take((len(self.own_streams) * self.stream_batch, self.width))
    pieces = []
    for i, k in enumerate(self.own_streams):
      pieces += self._gather_pieces(k, step, out[i * self.stream_batch : (i + 1) * self.stream_batch])
    self.pool.run(pieces)
    self.reader.recycle()
    return out

  def stream_rows(self, stream: int, step: int) -> np.ndarray:
    """Rows [step·b, (step+1)·b) of one stream, `[batch_size / streams, width]` (normalized)."""
    out = np.empty((self.stream_batch, self.width), np.float32)
    self.pool.run(self._gather_pieces(stream, step, out))
    self.reader.recycle()
    return out

  def _gather_pieces(self, stream: int, step: int, out: np.ndarray) -> list:
    """The work of filling `out` with one stream's rows of a step, as independent pieces (one
    per chunk that holds some of them: a sequential sweep of that chunk, scaled while in cache).
    Which rows a batch holds is fixed by the read order; within a window they are sorted, so
    each chunk's rows are one contiguous run of `out`."""
    pieces, filled = [], 0
    for key, rows in self.order.plan(stream, step, self.stream_batch):
      w = self.reader.window(key)
      bounds = np.searchsorted(rows, np.concatenate([[0], w.ends]))  # the rows each chunk holds
      for j, part in enumerate(w.parts):
        local = rows[bounds[j] : bounds[j + 1]] - (w.ends[j - 1] if j else 0)
        if len(local):
          pieces.append(functools.partial(self._gather, part, local, out[filled : filled + len(local)]))
          filled += len(local)
    return pieces

  def _gather(self, part: np.ndarray, local: np.ndarray, block: np.ndarray) -> None:
    np.take(part, local, axis=0, out=block, mode="clip")  # "raise" would buffer `block`
    if self._divisor != 1:
      np.divide(block, self._divisor, out=block)

  # ---------------------------------------------------------------- BatchSource

  def rows(self, step: int) -> np.ndarray:
    """This process's rows of `step` (prefetched in the background when read in order)."""
    return self._prefetch.get(step)

  def close(self) -> None:
    """Stops the prefetch thread (also done when a new `batch(step)` jumps elsewhere)."""
    self._prefetch.close()
    self.reader.forget_reads_ahead()
    self.pool.close()

  def describe(self) -> dict:
    return {
      "kind": "store",
      "root": self.store.root,
      "site": self.site,
      "rows": self.store.rows,
      "seed": self.seed,
      "batch_size": self.batch_size,
      "window_chunks": self.window_chunks,
      "streams": self.streams,
    }
