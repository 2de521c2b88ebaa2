"""Host rows onto the mesh: a global `[batch, width]` array sharded over `data`, built without a copy."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding


def aligned_empty(shape: tuple[int, int]) -> np.ndarray:
  """An uninitialized float32 array starting on a 64-byte boundary: JAX on CPU adopts such a
  buffer as the device array without copying it (a misaligned one is copied, ~3 GB/s here)."""
  n = shape[0] * shape[1] * 4
  raw = np.empty(n + 64, np.uint8)
  start = -raw.ctypes.data % 64
  return raw[start : start + n].view(np.float32).reshape(shape)


def global_batch(local_rows: np.ndarray, sharding: NamedSharding, shape: tuple[int, int]) -> jax.Array:
  """The global array of shape `shape` whose rows on this process's devices are `local_rows`.
  JAX on CPU may keep using (zero-copy) the host buffer, so `local_rows` must never be written again."""
  return jax.make_array_from_process_local_data(sharding, local_rows, shape)
