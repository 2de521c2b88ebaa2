"""The device mesh and the rules that map named array axes onto it.

One mesh with axes `data` (batch) and `model` (attention heads, d_ff, SAE latents). Arrays
declare *logical* axis names (`"heads"`, `"ff"`, ...); `LOGICAL_RULES` says which mesh axis
each one shards over. Axes with `required=True` must divide evenly (a clear error otherwise);
the others fall back to replication when they do not divide (e.g. 1 KV head on 4 devices,
which is how GQA is usually served).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"

# logical axis -> (mesh axis, must divide evenly)
LOGICAL_RULES: dict[str, tuple[str, bool]] = {
  "batch": (DATA, True),
  "heads": (MODEL, True),
  "ff": (MODEL, True),
  "kv_heads": (MODEL, False),
  "vocab": (MODEL, False),
  "latents": (MODEL, True),
}


def use_xnnpack_on_cpu() -> None:
  """Asks XLA:CPU for its XNNPACK matmul kernels (~15-20% faster Gemma forward on this CPU).

  XLA reads `XLA_FLAGS` when the backend starts, so call this before the first device query.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_use_xnnpack" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_use_xnnpack=true".strip()


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `data × model` mesh over `devices` (default: all); `data=-1` takes what `model` leaves.

  Axes are `AxisType.Auto`: shardings are given at `jax.jit` boundaries and XLA propagates
  them inside, which is what the model code is written for.
  """
  devices = list(jax.devices() if devices is None else devices)
  if model < 1 or len(devices) % model:
    raise ValueError(f"mesh axis 'model'={model} does not divide the {len(devices)} devices")
  if data == -1:
    data = len(devices) // model
  if data * model > len(devices):
    raise ValueError(f"mesh data={data} × model={model} needs {data * model} devices; {len(devices)} available")
  return jax.make_mesh(
    (data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[: data * model]
  )


def logical_spec(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int], what: str = "array") -> P:
  """PartitionSpec for an array whose dimensions carry logical names `axes`."""
  spec = []
  for name, size in zip(axes, shape, strict=True):
    rule = LOGICAL_RULES.get(name) if name else None
    if rule is None:
      spec.append(None)
      continue
    mesh_axis, required = rule
    n = mesh.shape[mesh_axis]
    if size % n == 0:
      spec.append(mesh_axis if n > 1 else None)
    elif required:
      raise ValueError(f"{what}: {name} dimension {size} is not divisible by mesh axis {mesh_axis!r} of size {n}")
    else:
      spec.append(None)
  return P(*spec)


def logical_sharding(
  mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int], what: str = "array"
) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(mesh, axes, shape, what))


def put(x: np.ndarray, mesh: Mesh, axes: Sequence[str | None], what: str = "array") -> jax.Array:
  """Places a host array on the mesh by the logical rules (each process supplies the whole array)."""
  sharding = logical_sharding(mesh, axes, x.shape, what)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def sae_model_axis(n_devices: int, widths: Sequence[int], latents_per_device: int = 16_384) -> int:
  """Gemma Scope's rule of thumb (docs/recipe.md §6) for the size of the `model` axis of an SAE sweep.

  Sweeps of 16.4K-wide SAEs train data parallel; wider ones shard latents over `model` until
  each device holds about `latents_per_device` of the widest SAE. The axis is a power of two
  that divides the device count and every width.
  """
  model = 1
  while (
    max(widths) // model > latents_per_device
    and n_devices % (2 * model) == 0
    and all(w % (2 * model) == 0 for w in widths)
  ):
    model *= 2
  return model


def owned_blocks(mesh: Mesh, rows: int, blocks: int, what: str) -> list[int]:
  """The blocks (equal row ranges of a `[rows, ...]` array sharded over `data`, `blocks` of
  them) held by this process's devices, in row order.

  This is how a process finds the store shards it writes and the loader streams it reads: the
  split of the data into blocks stays fixed while the number of processes changes. Each block
  must sit wholly on one process; otherwise the error names `what` to change.
  """
  if rows % blocks:
    raise ValueError(f"{what}={blocks} does not divide the batch of {rows} rows")
  size = rows // blocks
  held = set()
  for index in NamedSharding(mesh, P(DATA)).addressable_devices_indices_map((rows,)).values():
    lo, hi, _ = index[0].indices(rows)
    held.update(range(lo, hi))
  owned = sorted({r // size for r in held})
  if len(held) != len(owned) * size or not all(set(range(b * size, (b + 1) * size)) <= held for b in owned):
    raise ValueError(
      f"{what}={blocks}: a block of {size} rows would span processes; use a multiple of the "
      f"process count ({jax.process_count()}) that divides the batch"
    )
  return owned


def host_array(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) array on this host: every process gets every row."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
