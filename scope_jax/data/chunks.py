"""Reading a store's chunks a window at a time, checked.

A window (data/order.py) is `window_chunks` chunks of one stream's epoch order. The reader keeps
the last few windows in memory, names the shard and chunk of any read that fails (never zeros),
and finds rows with NaN or Inf: an error with counts, or with `nonfinite="skip"` replaced by other
rows of the same window and counted in `skipped`. Each chunk's read, conversion and check is one
piece of work for the loader's worker pool.

Two ways to read a chunk, the same rows either way:
- a local store's chunk files (the layout `Store.chunk_files` confirms) are read by the worker
  itself, a segment at a time, each segment checksummed, converted to float32 and summed while
  still in cache, into buffers reused once their window is evicted. Tensorstore's own decoding of
  these chunks runs at 1-2 GB/s whatever its concurrency and fresh memory costs a page fault per
  4 KiB, which is what kept the loader from scaling with cores (benchmarks/README.md);
- otherwise (GCS) through tensorstore, whose asynchronous reads of the window that follows are
  started as soon as one is in hand, so network latency overlaps the window's batches.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import crc32c
import ml_dtypes
import numpy as np

from scope_jax.activations.store import Store, StoreError
from scope_jax.core.choices import NONFINITE
from scope_jax.data.order import StreamOrder, WindowKey
from scope_jax.parallel.workers import WorkerPool

SEGMENT_BYTES = 1 << 19  # what a chunk file is read in: checksummed, converted and summed while in cache
ITEMSIZE = {"float32": 4, "bfloat16": 2}


class Window(NamedTuple):
  parts: list[np.ndarray]  # the window's chunks as read, [rows_j, width] each
  ends: np.ndarray  # cumulative rows of `parts`
  buffers: list[np.ndarray]  # the reused buffers `parts` lie in (local files only)


def read_chunk_file(path: Path, dtype: str, out_rw: np.ndarray) -> np.ndarray:
  """Reads one chunk file (zarr3 `bytes` + `crc32c`: `[rows, width]` little-endian `dtype`, then
  the CRC-32C of those bytes) into float32 `out_rw`; returns each row's sum (non-finite exactly
  when the row may hold NaN or Inf). Raises OSError or ValueError for a missing, short or damaged
  file."""
  rows, width = out_rw.shape
  row_bytes = width * ITEMSIZE[dtype]
  segment_rows = max(1, SEGMENT_BYTES // row_bytes)
  scratch = None if dtype == "float32" else np.empty((segment_rows, width), np.uint16)  # bfloat16 bits
  sums_r = np.empty(rows, np.float32)
  fd = os.open(path, os.O_RDONLY)
  try:
    if (size := os.fstat(fd).st_size) != rows * row_bytes + 4:
      raise ValueError(f"{path}: {size} bytes, expected {rows * row_bytes + 4} ({rows} rows of {row_bytes} and a CRC)")
    crc = 0
    for lo in range(0, rows, segment_rows):
      hi = min(lo + segment_rows, rows)
      segment = out_rw[lo:hi] if scratch is None else scratch[: hi - lo]
      if os.preadv(fd, [segment], lo * row_bytes) != segment.nbytes:
        raise ValueError(f"{path}: shorter than its {rows} rows")
      crc = crc32c.crc32c(segment, value=crc)
      if scratch is not None:
        out_rw[lo:hi] = segment.view(ml_dtypes.bfloat16)
      np.add.reduce(out_rw[lo:hi], axis=1, out=sums_r[lo:hi])
    stored = int.from_bytes(os.pread(fd, 4, rows * row_bytes), "little")
  finally:
    os.close(fd)
  if crc != stored:
    raise ValueError(f"{path}: its rows' CRC-32C is {crc:#010x}, the file says {stored:#010x} (damaged)")
  return sums_r


class WindowReader:
  """Windows of one site of a store; `chunks[c]` = (shard, first row in the shard, rows)."""

  def __init__(
    self,
    store: Store,
    site: str,
    chunks: list,
    order: StreamOrder,
    nonfinite: str,
    keep: int,
    seed: int,
    pool: WorkerPool,
  ):
    if nonfinite not in NONFINITE:
      raise ValueError(f"nonfinite {nonfinite!r}: expected one of {NONFINITE}")
    self.store, self.site, self.chunks, self.order, self.pool = store, site, chunks, order, pool
    self.nonfinite, self.keep, self.seed = nonfinite, keep, seed
    self.width = store.width(site)
    self.skipped = 0
    self._windows: OrderedDict[WindowKey, Window] = OrderedDict()
    self._pending: dict[WindowKey, list] = {}  # tensorstore reads started ahead of use
    self._files = [store.chunk_files(site, shard) for shard in range(len(store.shard_rows))]
    self._free: list[np.ndarray] = []  # chunk buffers no window holds
    self._evicted: list[np.ndarray] = []  # buffers of evicted windows, free once `recycle` is called
    self._read_ahead = any(files is None for files in self._files)  # tensorstore reads to start early

  def _reads(self, ids: np.ndarray) -> list[tuple[int, Callable[[], tuple[np.ndarray, np.ndarray]], np.ndarray | None]]:
    """(chunk id, read, buffer) for chunks `ids`; `read()` gives the chunk as float32 `[rows, width]`
    and its rows' sums. Tensorstore's reads are started now (buffer None); a local file is read
    when called, into `buffer` (one of those freed, else new)."""
    reads = []
    for c in ids:
      shard, lo, rows = self.chunks[c]
      if self._files[shard] is not None:
        buffer = self._free.pop() if self._free else np.empty((self.store.chunk_rows, self.width), np.float32)
        reads.append((c, functools.partial(self._read_file, c, buffer), buffer))
      else:
        future = self.store.array(self.site, shard)[lo : lo + rows].read()
        reads.append((c, functools.partial(self._decoded, future), None))
    return reads

  def _read_file(self, c: int, buffer_rw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shard, lo, rows = self.chunks[c]
    directory, dtype = self._files[shard]
    sums_r = read_chunk_file(directory / "c" / str(lo // self.store.chunk_rows) / "0", dtype, buffer_rw)
    return buffer_rw[:rows], sums_r[:rows]

  @staticmethod
  def _decoded(future) -> tuple[np.ndarray, np.ndarray]:
    part = np.asarray(future.result(), np.float32)
    return part, np.add.reduce(part, axis=1)

  def _chunk_name(self, c: int) -> str:
    shard, lo, _ = self.chunks[c]
    return f"shard {shard} chunk {lo // self.store.chunk_rows}"

  def window(self, key: WindowKey) -> Window:
    """Window `key` (read now, or from the reads started ahead); starts the next one's reads."""
    if key not in self._windows:
      ids = self.order.window_ids(key)
      reads = self._pending.pop(key, None) or self._reads(ids)
      checked = self.pool.run([functools.partial(self._checked_chunk, c, read) for c, read, _ in reads])
      parts = [part for part, _ in checked]
      self._handle_nonfinite(parts, [bad for _, bad in checked], key, ids)
      buffers = [buffer for _, _, buffer in reads if buffer is not None]
      self._windows[key] = Window(parts, np.cumsum([len(p) for p in parts]), buffers)
      while len(self._windows) > self.keep:
        self._evicted += self._windows.popitem(last=False)[1].buffers
      following = self.order.next_window(key)
      if self._read_ahead and following not in self._windows and following not in self._pending:
        self._pending[following] = self._reads(self.order.window_ids(following))
    return self._windows[key]

  def recycle(self) -> None:
    """Makes the buffers of evicted windows free for new reads: called once nothing can still be
    reading them (after the pieces of a batch, which may span an evicted window, have run)."""
    self._free += self._evicted
    self._evicted = []

  def forget_reads_ahead(self) -> None:
    """Drops reads started for where a stream was (a jump elsewhere may never use them)."""
    self._pending.clear()

  def _checked_chunk(self, c: int, read) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `c` as float32 `[rows, width]` once read, and its rows holding NaN or Inf. A NaN or
    Inf anywhere in a row makes its sum non-finite, so one pass finds the candidates; the exact
    test runs on those alone."""
    try:
      part, sums = read()
    except Exception as e:
      shard, lo, _ = self.chunks[c]
      raise StoreError(
        f"{self.store.root}: shard {shard} site {self.site} chunk {lo // self.store.chunk_rows} "
        f"(rows {lo}..) cannot be read: {e}"
      ) from e
    suspects = np.flatnonzero(~np.isfinite(sums))
    return part, suspects[~np.isfinite(part[suspects]).all(axis=1)]

  def _handle_nonfinite(self, parts: list[np.ndarray], bad: list[np.ndarray], key: WindowKey, ids) -> None:
    """Raises on rows with NaN or Inf (`bad[j]`: those of `parts[j]`), or (nonfinite="skip")
    overwrites them with other rows of the window."""
    n_bad = sum(len(b) for b in bad)
    if not n_bad:
      return
    if self.nonfinite == "error":
      detail = ", ".join(
        f"{self._chunk_name(c)} ({len(b)} rows)"
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
