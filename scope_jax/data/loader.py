"""The bucketed shuffle loader: per-host, deterministic, resumable batches from a finished store.

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
- A missing or corrupt chunk is an error naming shard and chunk (never zeros); rows with NaN or
  Inf are an error with counts, or with `nonfinite="skip"` are replaced by other rows of the same
  window and counted in `loader.skipped`.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scope_jax.activations.store import Store, StoreError, open_store
from scope_jax.data.normalization import scale_and_mean
from scope_jax.parallel.mesh import DATA, owned_blocks

NONFINITE = ("error", "skip")


class _Window(NamedTuple):
  parts: list[np.ndarray]  # the window's chunks as read, [rows_j, width] each
  ends: np.ndarray  # cumulative rows of `parts`
  perm: np.ndarray  # the window's row permutation


def _empty_aligned(shape: tuple[int, int]) -> np.ndarray:
  """An uninitialized float32 array starting on a 64-byte boundary: JAX on CPU adopts such a
  buffer as the device array without copying it (a misaligned one is copied, ~3 GB/s here)."""
  n = shape[0] * shape[1] * 4
  raw = np.empty(n + 64, np.uint8)
  start = -raw.ctypes.data % 64
  return raw[start : start + n].view(np.float32).reshape(shape)


class StoreLoader:
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
  ):
    self.store = open_store(root) if isinstance(root, str) else root
    if nonfinite not in NONFINITE:
      raise ValueError(f"nonfinite {nonfinite!r}: expected one of {NONFINITE}")
    self.site, self.seed, self.mesh, self.nonfinite = site, seed, mesh, nonfinite
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
    self.window_chunks, self.prefetch_depth = max(1, window_chunks), prefetch
    stats = self.store.stats(site)
    self.scale, divisor, self.mean = scale_and_mean(stats["mean_sq_norm"], stats["mean"], normalize)
    self._divisor = np.float32(divisor)
    chunk_rows = self.store.config["chunk_rows"]
    # every chunk of every shard: (shard, first row in shard, rows)
    self.chunks = [
      (shard, lo, min(chunk_rows, rows - lo))
      for shard, rows in enumerate(self.store.shard_rows)
      for lo in range(0, rows, chunk_rows)
    ]
    if len(self.chunks) < self.streams:
      raise StoreError(f"{self.store.root}: {len(self.chunks)} chunks cannot feed {self.streams} streams")
    self._epochs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    self._epoch_starts = {k: [0] for k in self.own_streams}  # where each epoch starts, extended as needed
    self._windows: OrderedDict[tuple[int, int, int], _Window] = OrderedDict()
    self._pending: dict[tuple[int, int, int], list] = {}  # reads started ahead of use
    self.skipped = 0
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._next_step: int | None = None
    self._stop = threading.Event()

  # ---------------------------------------------------------------- the pure (seed, step) -> rows map

  def _order(self, stream: int, epoch: int) -> np.ndarray:
    """The chunks a stream reads in `epoch`, in order: its round-robin share of the permutation."""
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))[stream :: self.streams]

  def _epoch(self, stream: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """A stream's chunk ids in the epoch's order and their cumulative row ends."""
    if (stream, epoch) not in self._epochs:
      order = self._order(stream, epoch)
      ends = np.cumsum([self.chunks[c][2] for c in order])
      self._epochs = {k: v for k, v in self._epochs.items() if k[0] != stream or k[1] >= epoch - 1}
      self._epochs[stream, epoch] = (order, ends)
    return self._epochs[stream, epoch]

  def _locate(self, stream: int, position: int) -> tuple[int, int]:
    """(epoch, offset in that epoch) of a position in a stream."""
    starts = self._epoch_starts[stream]
    while position >= starts[-1]:
      starts.append(starts[-1] + sum(self.chunks[c][2] for c in self._order(stream, len(starts) - 1)))
    epoch = int(np.searchsorted(starts, position, side="right")) - 1
    return epoch, position - starts[epoch]

  def _window_ids(self, key: tuple[int, int, int]) -> np.ndarray | None:
    """The chunk ids of window `key` = (stream, epoch, window); None past the epoch's end."""
    stream, epoch, window = key
    order, _ = self._epoch(stream, epoch)
    ids = order[window * self.window_chunks : (window + 1) * self.window_chunks]
    return ids if len(ids) else None

  def _read(self, ids: np.ndarray) -> list:
    """Starts tensorstore's asynchronous reads of chunks `ids`; returns (chunk id, future) pairs."""
    return [
      (
        c,
        self.store.array(self.site, self.chunks[c][0])[
          self.chunks[c][1] : self.chunks[c][1] + self.chunks[c][2]
        ].read(),
      )
      for c in ids
    ]

  def _window(self, key: tuple[int, int, int]) -> _Window:
    """One window of a stream: its chunks as read and the window's row permutation. The next
    window's reads start as soon as this one is in hand, so they overlap its batches."""
    if key not in self._windows:
      ids = self._window_ids(key)
      reads = self._pending.pop(key, None) or self._read(ids)
      parts = []
      for c, future in reads:
        try:
          parts.append(np.asarray(future.result(), np.float32))
        except Exception as e:
          shard, lo, _ = self.chunks[c]
          raise StoreError(
            f"{self.store.root}: shard {shard} site {self.site} chunk {lo // self.store.config['chunk_rows']} "
            f"(rows {lo}..) cannot be read: {e}"
          ) from e
      self._check_finite(parts, key, ids)
      ends = np.cumsum([len(p) for p in parts])
      perm = np.random.default_rng([self.seed, key[1], key[0], key[2]]).permutation(int(ends[-1]))
      self._windows[key] = _Window(parts, ends, perm)
      while len(self._windows) > 2 * len(self.own_streams):
        self._windows.popitem(last=False)
      following = (key[0], key[1], key[2] + 1)
      following_ids = self._window_ids(following)
      if following_ids is None:
        following = (key[0], key[1] + 1, 0)
        following_ids = self._window_ids(following)
      if following not in self._windows and following not in self._pending:
        self._pending[following] = self._read(following_ids)
    return self._windows[key]

  def _check_finite(self, parts: list[np.ndarray], key: tuple[int, int, int], ids) -> None:
    """Raises on rows with NaN or Inf, or (nonfinite="skip") overwrites them with other rows of
    the window. A NaN or Inf anywhere in a row makes its sum non-finite, so one BLAS pass finds
    the candidates; the exact test runs on those alone."""
    ones, bad = np.ones(self.width, np.float32), []
    for p in parts:
      suspects = np.flatnonzero(~np.isfinite(p @ ones))
      bad.append(suspects[~np.isfinite(p[suspects]).all(axis=1)])
    n_bad = sum(len(b) for b in bad)
    if not n_bad:
      return
    if self.nonfinite == "error":
      detail = ", ".join(
        f"shard {self.chunks[c][0]} chunk {self.chunks[c][1] // self.store.config['chunk_rows']} ({len(b)} rows)"
        for c, b in sorted(zip(ids, bad), key=lambda t: self.chunks[t[0]])
        if len(b)
      )
      raise StoreError(
        f"{self.store.root}: {n_bad} rows of site {self.site} hold NaN or Inf: {detail}; "
        f"set data.nonfinite='skip' to skip such rows"
      )
    good = [(j, r) for j, (p, b) in enumerate(zip(parts, bad)) for r in np.setdiff1d(np.arange(len(p)), b)]
    if not good:
      raise StoreError(f"{self.store.root}: every row of a window of site {self.site} holds NaN or Inf")
    rng = np.random.default_rng([self.seed, *key, 1])
    for j, b in enumerate(bad):
      for r, pick in zip(b, rng.choice(len(good), len(b))):
        parts[j][r] = parts[good[pick][0]][good[pick][1]]
    self.skipped += n_bad

  def local_rows(self, step: int) -> np.ndarray:
    """This process's rows of step `step` (its streams' rows, in stream order), float32
    `[batch_size / processes, width]`."""
    out = _empty_aligned((len(self.own_streams) * self.stream_batch, self.width))
    for i, k in enumerate(self.own_streams):
      self.stream_rows(k, step, out[i * self.stream_batch : (i + 1) * self.stream_batch])
    return out

  def stream_rows(self, stream: int, step: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [step·b, (step+1)·b) of one stream, `[batch_size / streams, width]` (normalized).

    Which rows a batch holds is fixed by the window permutation; within the batch they are
    grouped by chunk, so each is gathered in one sequential sweep and scaled while in cache."""
    out = np.empty((self.stream_batch, self.width), np.float32) if out is None else out
    position, filled = step * self.stream_batch, 0
    while filled < self.stream_batch:
      epoch, offset = self._locate(stream, position)
      _, ends = self._epoch(stream, epoch)
      window = int(np.searchsorted(ends, offset, side="right")) // self.window_chunks
      window_start = int(ends[window * self.window_chunks - 1]) if window else 0
      w = self._window((stream, epoch, window))
      take = min(self.stream_batch - filled, window_start + int(w.ends[-1]) - offset)
      rows = np.sort(w.perm[offset - window_start : offset - window_start + take])
      part_of_row = np.searchsorted(w.ends, rows, side="right")
      for j in np.unique(part_of_row):
        local = rows[part_of_row == j] - (w.ends[j - 1] if j else 0)
        block = out[filled : filled + len(local)]
        np.take(w.parts[j], local, axis=0, out=block, mode="clip")  # "raise" would buffer `out`
        if self._divisor != 1:
          np.divide(block, self._divisor, out=block)
        filled += len(local)
      position += take
    return out

  # ---------------------------------------------------------------- BatchSource

  def _make_array(self, local: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self.sharding, local, (self.batch_size, self.width))

  def batch(self, step: int) -> jax.Array:
    """The global batch of `step` (prefetched in the background when read in order)."""
    if self._next_step != step:
      self._restart(step)
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    self._next_step = step + 1
    return self._make_array(item)

  def _restart(self, step: int) -> None:
    self.close()
    self._stop = threading.Event()
    self._queue = queue.Queue(self.prefetch_depth)
    stop, q = self._stop, self._queue

    # Every batch gets fresh memory: JAX on CPU may keep using (zero-copy) the host buffer an
    # array was made from, so a buffer handed to it is never written again.
    def produce():
      s = step
      while not stop.is_set():
        try:
          item = self.local_rows(s)
        except BaseException as e:
          item = e
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if isinstance(item, BaseException):
          return
        s += 1

    self._thread = threading.Thread(target=produce, daemon=True)
    self._thread.start()

  def close(self) -> None:
    """Stops the prefetch thread (also when a new `batch(step)` jumps elsewhere)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    self._next_step = None
    self._pending.clear()  # reads started for where the stream was; a jump may never use them

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
