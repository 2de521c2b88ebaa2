"""`jax.distributed` from the environment: one program, N processes.

- Cloud TPU pods: `jax.distributed.initialize()` finds its peers itself (SCOPE_JAX_DISTRIBUTED=auto,
  or the TPU environment being present).
- Elsewhere (GPU clusters, several processes on one machine) set
  SCOPE_JAX_COORDINATOR=host:port, SCOPE_JAX_NUM_PROCESSES=N and SCOPE_JAX_PROCESS_ID=i
  (SLURM's SLURM_NTASKS / SLURM_PROCID are used when the last two are unset).

On CPU the collectives run over gloo. Call before anything touches a device.
"""

from __future__ import annotations

import os

import jax


def _env_int(*names: str) -> int | None:
  for name in names:
    if os.environ.get(name, "") != "":
      try:
        return int(os.environ[name])
      except ValueError as e:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} is not an integer") from e
  return None


def initialize_from_env() -> bool:
  """Initializes jax.distributed when the environment asks for it; True if it did."""
  coordinator = os.environ.get("SCOPE_JAX_COORDINATOR")
  auto = os.environ.get("SCOPE_JAX_DISTRIBUTED") == "auto"
  if not coordinator and not auto:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto:
    jax.distributed.initialize()
    return True
  count = _env_int("SCOPE_JAX_NUM_PROCESSES", "SLURM_NTASKS")
  index = _env_int("SCOPE_JAX_PROCESS_ID", "SLURM_PROCID")
  if count is None or index is None:
    raise ValueError("SCOPE_JAX_COORDINATOR is set but SCOPE_JAX_NUM_PROCESSES / SCOPE_JAX_PROCESS_ID are not")
  if not 0 <= index < count:
    raise ValueError(f"SCOPE_JAX_PROCESS_ID={index} is outside [0, SCOPE_JAX_NUM_PROCESSES={count})")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=index,
                             initialization_timeout=int(os.environ.get("SCOPE_JAX_INIT_TIMEOUT", "120")))
  return True
