"""What the accelerators a job may run on hold and compute: memory and peak matmul rates.

The step's tiling (train/tiling.py) reads a device's memory from `memory_stats()` where the
backend reports it and from `KINDS` otherwise; the plan (`scope-jax sweep --dry_run --target`)
sizes jobs for a `TARGETS` slice it does not run on. Peaks are the vendors' dense figures
(no sparsity), per chip.
"""

from __future__ import annotations

import dataclasses

import jax

GB = 10**9


@dataclasses.dataclass(frozen=True)
class DeviceKind:
  name: str
  memory_bytes: int  # HBM per chip
  bf16_flops: float  # peak dense bfloat16 matmul FLOP/s per chip
  f32_flops: float  # peak true-float32 matmul FLOP/s (Precision.HIGHEST)


# f32: NVIDIA's FP32 (non-tensor-core) figure; a TPU runs HIGHEST as six bfloat16 passes
KINDS = {
  "h100": DeviceKind("H100 SXM", 80 * GB, 989e12, 67e12),
  "h200": DeviceKind("H200 SXM", 141 * GB, 989e12, 67e12),
  "a100": DeviceKind("A100 SXM 80GB", 80 * GB, 312e12, 19.5e12),
  "v4": DeviceKind("TPU v4", 32 * GB, 275e12, 275e12 / 6),
  "v5e": DeviceKind("TPU v5e", 16 * GB, 197e12, 197e12 / 6),
  "v5p": DeviceKind("TPU v5p", 95 * GB, 459e12, 459e12 / 6),
  "v6e": DeviceKind("TPU v6e", 32 * GB, 918e12, 918e12 / 6),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice: `chips` devices of one kind (a TPU v4-32 slice has 16 chips: its number counts cores)."""

  name: str
  kind: DeviceKind
  chips: int


def _targets() -> dict[str, Target]:
  out = {}
  for n in (8, 16, 32, 64, 128, 256):  # GPU hosts of 8, TPU slices named by cores (v4, v5p) or chips
    for gpu in ("h100", "h200", "a100"):
      out[f"{gpu}x{n}"] = Target(f"{gpu}x{n}", KINDS[gpu], n)
    for tpu in ("v4", "v5p"):
      out[f"{tpu}-{n}"] = Target(f"{tpu}-{n}", KINDS[tpu], n // 2)
    for tpu in ("v5e", "v6e"):
      out[f"{tpu}-{n}"] = Target(f"{tpu}-{n}", KINDS[tpu], n)
  return out


TARGETS = _targets()


def target(name: str) -> Target:
  """The slice named `name` (`h100x8`, `v4-32`, `v5e-16`, ...); a ValueError listing the names otherwise."""
  if name not in TARGETS:
    kinds = sorted({t.split("x")[0].split("-")[0] for t in TARGETS})
    raise ValueError(
      f"unknown target {name!r}: expected KIND-N for a TPU slice (v4-32, v5p-128, v5e-16, v6e-8) or KINDxN for "
      f"GPUs (h100x8, h200x16, a100x8), N in 8..256; kinds {kinds}"
    )
  return TARGETS[name]


def kind_of(device: jax.Device) -> DeviceKind | None:
  """The table's entry for a real device (by its `device_kind`), or None (a CPU, an unknown chip)."""
  label = device.device_kind.lower()
  for key, pattern in (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("v5e", "v5 lite"), ("v6e", "v6")):
    if pattern in label:
      return KINDS[key]
  if "v5" in label:
    return KINDS["v5p"]
  if "v4" in label:
    return KINDS["v4"]
  return None


def free_memory(device: jax.Device) -> int | None:
  """Bytes the device can still allocate: `memory_stats()` where the backend reports it, else the
  table's memory (less nothing: nothing is known to be in use); None on CPU."""
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  kind = kind_of(device)
  return None if kind is None else kind.memory_bytes
