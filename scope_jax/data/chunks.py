"""Reading a store's chunks a window at a time, checked, with the next window's reads started ahead.

A window (data/order.py) is `window_chunks` chunks of one stream's epoch order. The reader keeps
the last few windows in memory, starts tensorstore's asynchronous reads of the window that follows
as soon as one is in hand (so they overlap its batches), names the shard and chunk of any read that
fails (never zeros), and finds rows with NaN or Inf: an error with counts, or with
`nonfinite="skip"` replaced by other rows of the same window and counted in `skipped`. Each
chunk's conversion and check is one piece of work for the loader's worker pool.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from scope_jax.activations.store import Store, StoreError
from scope_jax.data.order import StreamOrder, WindowKey
from scope_jax.parallel.workers import WorkerPool

NONFINITE = ("error", "skip")


class Window(NamedTuple):
  parts: list[np.ndarray]  # the window's chunks as read, [rows_j, width] each
  ends: np.ndarray  # cumulative rows of `parts`


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
    self._pending: dict[WindowKey, list] = {}  # reads started ahead of use

  def _read(self, ids: np.ndarray) -> list:
    """Starts tensorstore's asynchronous reads of chunks `ids`; returns (chunk id, future) pairs."""
    reads = []
    for c in ids:
      shard, lo, rows = self.chunks[c]
      reads.append((c, self.store.array(self.site, shard)[lo : lo + rows].read()))
    return reads

  def _chunk_name(self, c: int) -> str:
    shard, lo, _ = self.chunks[c]
    return f"shard {shard} chunk {lo // self.store.chunk_rows}"

  def window(self, key: WindowKey) -> Window:
    """Window `key` (read now, or taken from the reads started ahead); starts the next one's reads."""
    if key not in self._windows:
      ids = self.order.window_ids(key)
      reads = self._pending.pop(key, None) or self._read(ids)
      checked = self.pool.run([functools.partial(self._checked_chunk, c, future) for c, future in reads])
      parts = [part for part, _ in checked]
      self._handle_nonfinite(parts, [bad for _, bad in checked], key, ids)
      self._windows[key] = Window(parts, np.cumsum([len(p) for p in parts]))
      while len(self._windows) > self.keep:
        self._windows.popitem(last=False)
      following = self.order.next_window(key)
      if following not in self._windows and following not in self._pending:
        self._pending[following] = self._read(self.order.window_ids(following))
    return self._windows[key]

  def forget_reads_ahead(self) -> None:
    """Drops reads started for where a stream was (a jump elsewhere may never use them)."""
    self._pending.clear()

  def _checked_chunk(self, c: int, future) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `c` as float32 `[rows, width]` once its read completes, and its rows holding NaN or
    Inf. A NaN or Inf anywhere in a row makes its sum non-finite, so one BLAS pass finds the
    candidates; the exact test runs on those alone."""
    try:
      part = np.asarray(future.result(), np.float32)
    except Exception as e:
      shard, lo, _ = self.chunks[c]
      raise StoreError(
        f"{self.store.root}: shard {shard} site {self.site} chunk {lo // self.store.chunk_rows} "
        f"(rows {lo}..) cannot be read: {e}"
      ) from e
    suspects = np.flatnonzero(~np.isfinite(part @ np.ones(self.width, np.float32)))
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
