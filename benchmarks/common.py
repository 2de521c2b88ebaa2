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


def matmul_peak_gflops(m: int = 2048, k: int = 640, n: int = 2048) -> tuple[float, float]:
  """(JAX, torch) float32 matmul GFLOP/s on this machine, for the bound beside each figure."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  a = np.random.default_rng(0).standard_normal((m, k), np.float32)
  b = np.random.default_rng(1).standard_normal((k, n), np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  matmul = jax.jit(jnp.matmul)
  jax_s, _ = seconds_per_call(lambda: matmul(ja, jb).block_until_ready(), repeats=20)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  torch_s, _ = seconds_per_call(lambda: ta @ tb, repeats=20)
  flops = 2 * m * k * n
  return flops / jax_s / 1e9, flops / torch_s / 1e9
