"""Host rows onto the mesh: a global `[batch, width]` array sharded over `data`, built without a copy."""

from __future__ import annotations

import sys

import jax
import numpy as np
from jax.sharding import NamedSharding

ALIGN = 64


def _aligned(raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """A float32 `shape` view of `raw` starting on a 64-byte boundary: JAX on CPU adopts such a
  buffer as the device array without copying it (a misaligned one is copied, ~3 GB/s here)."""
  start = -raw.ctypes.data % ALIGN
  return raw[start : start + shape[0] * shape[1] * 4].view(np.float32).reshape(shape)


class HostBuffers:
  """Uninitialized, aligned float32 batch buffers, each written again only once nothing holds it.

  JAX keeps using the host buffer an array was made from (zero-copy on CPU, until its transfer
  ends elsewhere) and holds a reference to it meanwhile, as does every numpy view of it; so a
  buffer whose reference count is down to this object's own is free. Reusing memory instead of
  taking fresh pages is what lets the loader scale with cores: each fresh page costs a fault and
  the kernel's zeroing, which do not speed up with a second thread (benchmarks/README.md). At most
  `keep` buffers are kept; beyond that a batch gets fresh memory."""

  def __init__(self, keep: int):
    self.keep = keep
    self._owned: list[np.ndarray] = []

  def take(self, shape: tuple[int, int]) -> np.ndarray:
    size = shape[0] * shape[1] * 4 + ALIGN
    for raw in self._owned:
      if raw.nbytes == size and sys.getrefcount(raw) == 3:  # held by the list, `raw` and the call alone
        return _aligned(raw, shape)
    raw = np.empty(size, np.uint8)
    if len(self._owned) < self.keep:
      self._owned.append(raw)
    return _aligned(raw, shape)


def global_batch(local_rows: np.ndarray, sharding: NamedSharding, shape: tuple[int, int]) -> jax.Array:
  """The global array of shape `shape` whose rows on this process's devices are `local_rows`.
  JAX on CPU may keep using (zero-copy) the host buffer, so `local_rows` must never be written again
  while anything holds it."""
  return jax.make_array_from_process_local_data(sharding, local_rows, shape)
