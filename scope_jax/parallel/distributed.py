"""`jax.distributed` from flags or the environment: one program, N processes.

- Cloud TPU VMs: `jax.distributed.initialize()` finds its peers itself, from the VM's metadata.
  Used when SCOPE_JAX_DISTRIBUTED=auto, which `launch/tpu.sh` sets on every worker. (Not guessed
  from device files: laptops with NPUs and Gaudi hosts have `/dev/accel*` too.)
- Elsewhere (GPU clusters, several processes on one machine): the coordinator `host:port`, the
  process count and this process's id, from the flags `--coordinator`, `--num_processes`,
  `--process_id`, or from SCOPE_JAX_COORDINATOR / SCOPE_JAX_NUM_PROCESSES / SCOPE_JAX_PROCESS_ID,
  or (count and id) from SLURM's SLURM_NTASKS / SLURM_PROCID. When two of these give a value
  for the same thing and disagree, that is an error naming both.

A process whose peer dies stops when the coordination service misses the peer's heartbeats for
SCOPE_JAX_HEARTBEAT_TIMEOUT seconds (default 100, JAX's own); it does not hang. Call before
anything touches a device; the entry point chooses the CPU collectives (the CLI: gloo, in
`cli.prepare_environment`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np

SOURCES = {  # what -> (flag, environment variables in order of precedence)
  "coordinator": ("--coordinator", ("SCOPE_JAX_COORDINATOR",)),
  "num_processes": ("--num_processes", ("SCOPE_JAX_NUM_PROCESSES", "SLURM_NTASKS")),
  "process_id": ("--process_id", ("SCOPE_JAX_PROCESS_ID", "SLURM_PROCID")),
}


def _resolve(what: str, flag_value: str | int | None) -> str | None:
  """The one value given for `what` by its flag and variables; an error if they disagree."""
  flag, names = SOURCES[what]
  given = [(flag, str(flag_value))] if flag_value not in (None, "") else []
  given += [(name, os.environ[name]) for name in names if os.environ.get(name, "") != ""]
  if len({value for _, value in given}) > 1:
    raise ValueError(
      f"{what} is given differently by " + " and ".join(f"{k}={v}" for k, v in given) + "; set one, or make them agree"
    )
  return given[0][1] if given else None


def _as_int(what: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{what}={value!r} is not an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Initializes jax.distributed when flags or the environment ask for it; True if it did."""
  address = _resolve("coordinator", coordinator)
  count, index = _resolve("num_processes", num_processes), _resolve("process_id", process_id)
  mode = os.environ.get("SCOPE_JAX_DISTRIBUTED", "")
  if mode not in ("", "auto", "off"):
    raise ValueError(f"SCOPE_JAX_DISTRIBUTED={mode!r}: expected auto, off or unset")
  heartbeat = _as_int("SCOPE_JAX_HEARTBEAT_TIMEOUT", os.environ.get("SCOPE_JAX_HEARTBEAT_TIMEOUT", "100"))
  if mode == "off":
    return False
  if not address and mode != "auto":
    if count not in (None, "1"):
      raise ValueError(
        f"{count} processes are expected but no coordinator is given (--coordinator or "
        "SCOPE_JAX_COORDINATOR=host:port; SCOPE_JAX_DISTRIBUTED=off runs one process alone)"
      )
    return False
  if jax.distributed.is_initialized():
    return True
  if not address:  # Cloud TPU: the cluster is detected from the VM's metadata
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    return True
  if count is None or index is None:
    raise ValueError(
      f"coordinator {address} is given but the process count or id is not "
      "(--num_processes/--process_id or SCOPE_JAX_NUM_PROCESSES/SCOPE_JAX_PROCESS_ID)"
    )
  count, index = _as_int("num_processes", count), _as_int("process_id", index)
  if not 0 <= index < count:
    raise ValueError(f"process_id {index} is outside [0, num_processes={count})")
  jax.distributed.initialize(
    coordinator_address=address,
    num_processes=count,
    process_id=index,
    initialization_timeout=_as_int("SCOPE_JAX_INIT_TIMEOUT", os.environ.get("SCOPE_JAX_INIT_TIMEOUT", "120")),
    heartbeat_timeout_seconds=heartbeat,
  )
  return True


def stop_together(failure: BaseException | None, elsewhere: Callable[[], BaseException]) -> None:
  """Raises process 0's `failure` on every process of the job (`elsewhere()` on the others, which
  cannot see it), so none is left waiting at a collective that process 0 never reaches; returns
  when process 0 had none. Every process must call it, with `failure` set only on process 0."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    if multihost_utils.broadcast_one_to_all(np.int32(failure is not None)):
      failure = failure or elsewhere()
  if failure is not None:
    raise failure
