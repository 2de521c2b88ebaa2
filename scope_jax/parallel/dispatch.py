"""One step in flight on XLA:CPU meshes.

XLA:CPU runs every device of a multi-device CPU mesh (`xla_force_host_platform_device_count`) on
one host thread pool, and a collective waits for its peers on a pool thread. With JAX's
asynchronous dispatch a loop enqueues step s+1 while step s still runs; when the two programs'
collectives hold the pool's threads between them, a device of one never gets a thread to reach
its rendezvous and XLA aborts the process after 40 s ("Termination timeout for `all reduce`").
Measured (AMD EPYC, 2 cores, 4×2 mesh): the CLT step (train/clt.py) deadlocked at its second step
3 times in 3; with each step waited for before the next is dispatched, 1,500 steps ran. The SAE
trainer hit the same abort about once in 1,000-2,000 steps. GPU and TPU order collectives on their
streams and keep asynchronous dispatch.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh


def needs_settling(mesh: Mesh) -> bool:
  """Whether steps on `mesh` must run one at a time: several CPU devices."""
  return mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


def settle(tree, mesh: Mesh) -> None:
  """Waits for `tree` (a step's outputs) where `mesh` needs it (`needs_settling`); call it after the
  host has prepared the next batch, so that work still overlaps the step."""
  if needs_settling(mesh):
    jax.block_until_ready(tree)
