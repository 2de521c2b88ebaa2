"""Whether a training job fits where it runs, decided before anything is allocated.

A job too wide for its memory would otherwise fail deep inside XLA or the allocator, or (seen with
4M latents at d 640 under an 8 GB address-space limit) stall in a futex wait while its lease is
renewed. The need is the trainer's state (every SAE's parameters and both Adam moments, sharded
over the mesh's `model` axis and held whole by each `data` replica), the step's temporaries and
the batches in flight; it is set against each device's memory (GPU, TPU) or, on CPU, where every
device is the host's memory, against what the host has.
"""

from __future__ import annotations

import dataclasses
import resource

import jax
import psutil

# The dense step's measured peak: under 1.3x (params + Adam + batch) (benchmarks/README.md), so its
# temporaries are taken as 0.3x of what they work on. The sparse step needs less.
STEP_TEMPORARIES = 0.3
BATCHES_IN_FLIGHT = 3  # the step's own and the loader's two made ahead
FLOAT = 4  # float32 parameters, moments and batches


class JobTooLarge(ValueError):
  """The job's memory need exceeds what its devices or host have; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class MemoryNeed:
  """Bytes per device."""

  params: int
  adam: int
  batches: int
  temporaries: int

  @property
  def total(self) -> int:
    return self.params + self.adam + self.batches + self.temporaries


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def need_per_device(groups, d_in: int, d_out: int, batch: int, mesh: jax.sharding.Mesh, skip: bool) -> MemoryNeed:
  """What one device holds while training `groups` (train/stacked.py Group) on `batch`-row batches."""
  model, data = mesh.shape.get("model", 1), mesh.shape.get("data", 1)
  values = 0
  for g in groups:
    per_sae = g.width * (d_in + d_out + 2) + d_out + (d_in * d_out if skip else 0)  # W_enc, W_dec, b_enc, θ, b_dec
    values += len(g.members) * per_sae
  params = FLOAT * values // model
  adam = 2 * params + 4 * sum(len(g.members) * g.width for g in groups) // model  # mu, nu; latent_step
  batches = BATCHES_IN_FLIGHT * FLOAT * -(-batch // data) * (d_in + (d_out if d_out != d_in else 0))
  temporaries = int(STEP_TEMPORARIES * (params + adam + batches))
  # A TopK or BatchTopK step holds one SAE's every local pre-activation and their bits (train/topk.py)
  ranked = [g.width // model for g in groups if g.activation != "jumprelu"]
  temporaries += 2 * FLOAT * -(-batch // data) * max(ranked, default=0)
  return MemoryNeed(params, adam, batches, temporaries)


def memory_available(devices: list) -> tuple[int, str]:
  """(bytes one device may use, what that is): the device's own limit on GPU and TPU; on CPU, the
  host's available memory (or what its address-space limit leaves) shared by its devices."""
  stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    limit, used = stats["bytes_limit"], stats.get("bytes_in_use", 0)
    return int(limit - used), f"{devices[0].device_kind} memory free ({_gib(limit)} in all)"
  have, what = psutil.virtual_memory().available, "available host memory"
  limit = resource.getrlimit(resource.RLIMIT_AS)[0]
  if limit != resource.RLIM_INFINITY:
    left = limit - psutil.Process().memory_info().vms
    if left < have:
      have, what = left, f"left under the process's address-space limit ({_gib(limit)}, ulimit -v)"
  return int(have // len(devices)), what + (f", shared by {len(devices)} CPU devices" if len(devices) > 1 else "")


def check_fits(groups, d_in: int, d_out: int, batch: int, mesh: jax.sharding.Mesh, skip: bool) -> MemoryNeed:
  """The job's need per device, or JobTooLarge naming need, have and what to change."""
  need = need_per_device(groups, d_in, d_out, batch, mesh, skip)
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  have, what = memory_available(local)
  if need.total > have:
    n = len(local)
    raise JobTooLarge(
      f"this training needs about {_gib(need.total * n)} ({_gib(need.params * n)} parameters, "
      f"{_gib(need.adam * n)} Adam state, {_gib(need.batches * n)} batches, {_gib(need.temporaries * n)} step "
      f"temporaries, over {n} devices of mesh {dict(mesh.shape)}); this process has {_gib(have * n)} ({what}). "
      "Train fewer or narrower SAEs per job (sweep.widths, sweep.l1_coefficients or sweep.k, sweep.seeds), a smaller "
      "train.batch_size, or spread the latents over more devices (mesh.model)"
    )
  return need
