"""How the blocked step walks the latents: block size, and whether pre-activations are kept.

The step (train/step.py) walks each device's latents a block at a time, twice. Two rules:

- **cache** (CPU): blocks whose `[rows, block]` temporaries stay near a cache-sized tile (4 MiB
  dense, 2 MiB sparse), the encoder recomputed in the second pass. Measured on CPU
  (benchmarks/README.md): the dense step's peak stays under 1.3× params + Adam + batch for ~4% of
  its speed; the sparse step is fastest with 2 MiB tiles.
- **memory** (GPU, TPU): the largest blocks whose temporaries fit `MEMORY_FRACTION` of what the
  device has free once the state is placed, normally the whole local width: one large matmul
  instead of hundreds of small ones and loop steps. Where the pre-activations of every local
  latent fit too, pass 1 keeps them and pass 2 reads them (`keep_pre`), so the dense step costs
  10·B·d·M FLOPs instead of 12. The kept values are pass 1's own, so the result is the same.

With gradient clipping (`recipe.clip_grad_norm`) the step forms every block's gradient once to
find the norm before it updates any block (train/step.py `gradient_norm`). Where one SAE's
gradient fits `gradient_bytes` (the cache and fixed rules: `HOST_GRADIENT_BYTES`; the memory
rule: what its budget leaves), that pass keeps the gradients and the update reads them instead of
forming them again: four of the clipped dense step's ten `[rows, block] × d` matmuls per block saved.

`train.latent_block` > 0 fixes the block (and keeps no pre-activations) on every backend.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils

from scope_jax.parallel.devices import free_memory

DENSE_TILE, SPARSE_TILE = 1 << 20, 1 << 19  # floats per `[rows, block]` temporary under the cache rule (4, 2 MiB)
MEMORY_FRACTION = 0.5  # of a device's free memory the step's temporaries may take under the memory rule
# Live `[rows, block]` float32-sized temporaries of one block: the dense step's pre-activations, ∂f,
# ∂pre, ∂θ, the pull and the masks; the sparse step's pre-activations, masks and packed words
DENSE_TEMPORARIES, SPARSE_TEMPORARIES = 8, 4
FLOAT = 4
HOST_GRADIENT_BYTES = 64 << 20  # one SAE's local gradient kept under clipping by the cache and fixed rules


@dataclasses.dataclass(frozen=True)
class Tiling:
  block: int  # latents per block
  keep_pre: bool  # pass 1's pre-activations kept for pass 2 (dense step only)
  rule: str  # "cache", "memory" or "fixed" (train.latent_block)
  gradient_bytes: int = 0  # under clipping, one SAE's gradient up to this size is kept between its passes

  def describe(self, width_local: int) -> str:
    blocks = width_local // self.block
    kept = "pre-activations kept" if self.keep_pre else "encoder recomputed in pass 2"
    return f"{blocks} block{'s' if blocks > 1 else ''} of {self.block} latents ({self.rule} rule, {kept})"


def _divisors(width_local: int, prefixes: tuple[int, ...], at_most: int) -> int:
  """The largest block ≤ `at_most` dividing the local width and every Matryoshka prefix size (no
  block straddles a prefix)."""
  sizes = (width_local, *prefixes)
  return max(k for k in range(1, max(1, min(at_most, width_local)) + 1) if all(n % k == 0 for n in sizes))


def choose_tiling(
  width_local: int,
  rows_local: int,
  sparse: bool,
  requested: int = 0,
  prefixes: tuple[int, ...] = (),
  free_bytes: int | None = None,
) -> Tiling:
  """The tiling of one group's step: `requested` latents per block if given; the cache rule when
  `free_bytes` is None (CPU); else the memory rule for a device with `free_bytes` free."""
  if requested:
    if any(n % requested for n in (width_local, *prefixes)):
      raise ValueError(
        f"train.latent_block {requested} does not divide the {width_local} latents each device holds"
        + (f" and every prefix size {list(prefixes)}" if prefixes else "")
        + "; use a common divisor or 0 (automatic)"
      )
    return Tiling(requested, False, "fixed", HOST_GRADIENT_BYTES)
  if free_bytes is None:
    tile = SPARSE_TILE if sparse else DENSE_TILE
    return Tiling(_divisors(width_local, prefixes, tile // rows_local), False, "cache", HOST_GRADIENT_BYTES)
  budget = MEMORY_FRACTION * free_bytes
  per_latent = FLOAT * rows_local * (SPARSE_TEMPORARIES if sparse else DENSE_TEMPORARIES)
  block = _divisors(width_local, prefixes, int(budget // per_latent))
  keep_pre = not sparse and FLOAT * rows_local * width_local + per_latent * block <= budget
  left = budget - per_latent * block - (FLOAT * rows_local * width_local if keep_pre else 0)
  return Tiling(block, keep_pre, "memory", max(0, int(left)))


def keeps_gradients(gradient_bytes: int, clip_norm: float, width_local: int, d_in: int, d_out: int) -> bool:
  """Whether the clipped step keeps one SAE's block gradients between its passes (see above)."""
  return bool(clip_norm) and FLOAT * width_local * (d_in + d_out + 3) <= gradient_bytes


def device_free_bytes(mesh: jax.sharding.Mesh) -> int | None:
  """Free bytes of the mesh's least-free device over every process (each must compile the same
  step), or None on CPU (the cache rule)."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  free = [free_memory(d) for d in local]
  if any(f is None for f in free):
    return None
  if jax.process_count() > 1:
    return int(np.min(multihost_utils.process_allgather(np.asarray(min(free), np.int64))))
  return min(free)
