"""A pool of host threads for the data path's per-item work, sized from the host's cores.

The loader's gather, scaling and NaN check and the extraction writer's shuffle, statistics and
encoding are numpy calls that release the GIL, over rows that split into independent pieces. A
`WorkerPool` runs those pieces on `workers` threads and returns their results in order; with one
worker it runs them inline, exactly as a single thread would. The pieces are cut the same way
whatever the worker count (callers cut by fixed row counts, never by `workers`), so the bytes
delivered, and every floating-point sum, do not depend on it.

A piece that raises is raised in the caller by `run`, after the pieces already started have
ended (they write only into buffers the failed call never hands out).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def host_cores() -> int:
  """The cores this process may run on (its CPU affinity, which containers and `taskset` set)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS has no affinity call
    return os.cpu_count() or 1


def resolve_workers(workers: int, field: str) -> int:
  """`workers` threads, or the host's cores for 0; `field` names the config field in the error."""
  if workers < 0:
    raise ValueError(f"{field} {workers}: expected a thread count >= 1, or 0 for the host's cores")
  return workers or host_cores()


def row_pieces(rows: int, piece_rows: int) -> list[tuple[int, int]]:
  """[lo, hi) ranges of at most `piece_rows` rows covering `rows` rows, in order."""
  return [(lo, min(lo + piece_rows, rows)) for lo in range(0, rows, piece_rows)]


class WorkerPool:
  """`run(tasks)` returns `[task() for task in tasks]`, computed on `workers` threads."""

  def __init__(self, workers: int, name: str):
    self.workers, self.name = workers, name
    self._executor: ThreadPoolExecutor | None = None

  def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
    if self.workers == 1 or len(tasks) <= 1:
      return [task() for task in tasks]
    if self._executor is None:
      self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
    futures = [self._executor.submit(task) for task in tasks]
    try:
      return [f.result() for f in futures]
    finally:
      for f in futures:  # a failed piece: the rest stop before the caller reuses their buffers
        f.cancel()
      for f in futures:
        if not f.cancelled():
          f.exception()

  def close(self) -> None:
    """Ends the threads (a later `run` starts new ones)."""
    if self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=True)
      self._executor = None
