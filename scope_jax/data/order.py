"""Which rows a batch holds: a pure function of (seed, streams, step) and the store's chunk sizes.

Nothing here reads data. The loader (loader.py) asks `StreamOrder.plan` which rows of which
windows make a stream's share of a step, and a reader (chunks.py) supplies the windows' rows;
`ArraySource` uses `epoch_permutation` for its rows as the loader does for its chunks.

- Per epoch the store's chunks are permuted with `default_rng([seed, epoch])` and dealt
  round-robin to the streams: within a stream's epoch each of its rows appears exactly once, so
  every row of the store appears exactly once per epoch.
- A stream's permuted chunks are cut into windows of `window_chunks`; the rows of a window are
  permuted with `default_rng([seed, epoch, stream, window])`.
- Step s of a stream is rows [s·b, (s+1)·b) of the stream's concatenated epochs (b = batch /
  streams).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WindowKey = tuple[int, int, int]  # (stream, epoch, window)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of `n` items (chunks of a store, rows of an array) in `epoch`."""
  return np.random.default_rng([seed, epoch]).permutation(n)


class StreamOrder:
  """The read order of `streams` disjoint streams over chunks of `chunk_rows[c]` rows each."""

  def __init__(self, chunk_rows: Sequence[int], seed: int, streams: int, window_chunks: int):
    if len(chunk_rows) < streams:
      raise ValueError(f"{len(chunk_rows)} chunks cannot feed {streams} streams")
    self.chunk_rows = np.asarray(chunk_rows, np.int64)
    self.seed, self.streams, self.window_chunks = seed, streams, max(1, window_chunks)
    self._epochs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    self._epoch_starts: dict[int, list[int]] = {}  # per stream, where each epoch starts; extended as needed
    self._last_permutation: dict[int, tuple[WindowKey, np.ndarray]] = {}  # per stream: a window serves many steps

  def epoch(self, stream: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """A stream's chunk ids in the epoch's order and their cumulative row ends."""
    if (stream, epoch) not in self._epochs:
      order = epoch_permutation(self.seed, epoch, len(self.chunk_rows))[stream :: self.streams]
      self._epochs = {k: v for k, v in self._epochs.items() if k[0] != stream or k[1] >= epoch - 1}
      self._epochs[stream, epoch] = (order, np.cumsum(self.chunk_rows[order]))
    return self._epochs[stream, epoch]

  def epoch_rows(self, stream: int, epoch: int) -> int:
    """How many rows a stream reads in `epoch`."""
    return int(self.epoch(stream, epoch)[1][-1])

  def locate(self, stream: int, position: int) -> tuple[int, int]:
    """(epoch, offset in that epoch) of a position in a stream."""
    starts = self._epoch_starts.setdefault(stream, [0])
    while position >= starts[-1]:
      starts.append(starts[-1] + self.epoch_rows(stream, len(starts) - 1))
    epoch = int(np.searchsorted(starts, position, side="right")) - 1
    return epoch, position - starts[epoch]

  def window_ids(self, key: WindowKey) -> np.ndarray | None:
    """The chunk ids of window `key`; None past the epoch's end."""
    stream, epoch, window = key
    order, _ = self.epoch(stream, epoch)
    ids = order[window * self.window_chunks : (window + 1) * self.window_chunks]
    return ids if len(ids) else None

  def next_window(self, key: WindowKey) -> WindowKey:
    """The window a stream reads after `key` (the first of the next epoch after the last)."""
    stream, epoch, window = key
    following = (stream, epoch, window + 1)
    return following if self.window_ids(following) is not None else (stream, epoch + 1, 0)

  def window_permutation(self, key: WindowKey) -> np.ndarray:
    """The order of the window's rows (indices into its chunks' concatenated rows)."""
    stream, epoch, window = key
    last = self._last_permutation.get(stream)
    if last is None or last[0] != key:
      rows = int(self.chunk_rows[self.window_ids(key)].sum())
      last = key, np.random.default_rng([self.seed, epoch, stream, window]).permutation(rows)
      self._last_permutation[stream] = last
    return last[1]

  def plan(self, stream: int, step: int, batch: int) -> list[tuple[WindowKey, np.ndarray]]:
    """Rows [step·batch, (step+1)·batch) of a stream, as [(window, sorted row indices into the
    window's concatenated chunks)], in order: the batch's rows are those windows' rows, in turn."""
    out, position, filled = [], step * batch, 0
    while filled < batch:
      epoch, offset = self.locate(stream, position)
      _, ends = self.epoch(stream, epoch)
      window = int(np.searchsorted(ends, offset, side="right")) // self.window_chunks
      window_start = int(ends[window * self.window_chunks - 1]) if window else 0
      key = (stream, epoch, window)
      perm = self.window_permutation(key)
      take = min(batch - filled, window_start + len(perm) - offset)
      out.append((key, np.sort(perm[offset - window_start : offset - window_start + take])))
      position, filled = position + take, filled + take
    return out
