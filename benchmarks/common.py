"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import psutil


class PeakRSS:
  """Peak resident memory above the level at entry, sampled every millisecond."""

  def __enter__(self):
    self._process = psutil.Process()
    self.baseline = self._process.memory_info().rss
    self.peak = self.baseline
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._process.memory_info().rss)
      time.sleep(0.001)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()

  @property
  def gib(self) -> float:
    return (self.peak - self.baseline) / 2**30


def seconds_per_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
  """(median seconds per call, peak extra GiB during the timed calls); `fn` must block."""
  for _ in range(warmup):
    fn()
  times = []
  with PeakRSS() as mem:
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
  return statistics.median(times), mem.gib
