"""What the trainer reads: global batches addressed by step.

A `BatchSource` gives the `Batch` of step `s` as a pure function of (seed, s), so a resumed job
asks for step `s` directly and sees what an uninterrupted one would have seen. A batch holds
global `[batch, width]` jax arrays sharded over the mesh's `data` axis, one per site it reads
(an SAE's input; a transcoder's input and target); each process builds only the rows its own
devices hold. `scale` is the normalization scalar C (docs/recipe.md §3): batches come divided by
it unless `normalize` is None, and export folds it back into the weights.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scope_jax.data.batch import Batch, BatchSource, SiteSource
from scope_jax.data.batcher import HostBuffers, global_batch
from scope_jax.data.loader import StoreLoader
from scope_jax.data.normalization import array_statistics, check_normalization, scale_and_mean
from scope_jax.data.order import epoch_permutation
from scope_jax.parallel.mesh import DATA, owned_blocks

# float16 is refused: Gemma's residual stream overflows its range (and rounds coarsely)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16))


class ArraySource(SiteSource):
  """Batches drawn from an in-memory (or memory-mapped) `[rows, width]` array.

  Epoch e visits the rows in the permutation `default_rng([seed, e])`; step s takes global
  positions `[s·B, (s+1)·B)` of the concatenated epochs, so every row appears once per epoch.
  C and μ are computed over every row.
  """

  def __init__(
    self,
    rows_nd: np.ndarray,
    batch_size: int,
    mesh: Mesh,
    seed: int = 0,
    normalize: str | None = "raw",
    name: str = "array",
  ):
    if rows_nd.ndim != 2 or rows_nd.shape[0] == 0:
      raise ValueError(f"{name}: expected a non-empty [rows, width] array; got shape {rows_nd.shape}")
    if rows_nd.dtype not in FLOAT_DTYPES:
      raise ValueError(f"{name}: dtype {rows_nd.dtype}; expected activations as {' or '.join(map(str, FLOAT_DTYPES))}")
    if rows_nd.shape[0] < batch_size:
      raise ValueError(f"{name}: {rows_nd.shape[0]} rows, fewer than one batch (train.batch_size {batch_size})")
    if batch_size % mesh.shape[DATA]:
      raise ValueError(f"batch_size {batch_size} is not divisible by the mesh's data axis ({mesh.shape[DATA]})")
    self.rows_nd, self.batch_size, self.mesh, self.seed, self.name = rows_nd, batch_size, mesh, seed, name
    self.width = rows_nd.shape[1]
    self.sharding = NamedSharding(mesh, P(DATA, None))
    self.scale, self.divisor, self.mean = scale_and_mean(*array_statistics(rows_nd, name), normalize, name)
    self._perm_cache: dict[int, np.ndarray] = {}
    self._buffers = HostBuffers(keep=4)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm_cache:
      self._perm_cache = {epoch: epoch_permutation(self.seed, epoch, self.rows_nd.shape[0])}
    return self._perm_cache[epoch]

  def _row_ids(self, start: int, stop: int) -> np.ndarray:
    n = self.rows_nd.shape[0]
    pos = np.arange(start, stop)
    epochs = pos // n
    out = np.empty(len(pos), np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(int(e))[pos[sel] % n]
    return out

  def local_rows(self, step: int) -> np.ndarray:
    """This process's rows of step `step` (its devices' blocks of the batch, in row order),
    read in sorted order (kinder to memory maps) and normalized."""
    blocks = self.mesh.shape[DATA]
    size = self.batch_size // blocks
    first = step * self.batch_size
    owned = owned_blocks(self.mesh, self.batch_size, blocks, "mesh.data")
    ids = np.concatenate([self._row_ids(first + b * size, first + (b + 1) * size) for b in owned])
    order = np.argsort(ids)
    out = self._buffers.take((len(ids), self.width))
    out[order] = self.rows_nd[ids[order]]
    if self.divisor != 1:
      np.divide(out, np.float32(self.divisor), out=out)
    return out

  def describe(self) -> dict:
    return {
      "kind": "array",
      "name": self.name,
      "rows": int(self.rows_nd.shape[0]),
      "width": self.width,
      "seed": self.seed,
      "batch_size": self.batch_size,
    }


class PairedSource:
  """A transcoder's batches: `Batch(x_bd, y_bd)`, row b of each its input site's and its target
  site's activation at the same row of one extraction (the store writes every site of a row
  together, and two sources of one store with one seed read the same rows in the same order).

  Input and target are each normalized by their own C ("centred" by default): a λ then means the
  same for a transcoder as for an SAE of the target site, whatever the two sites' scales (Gemma
  Scope divided both by √d_model instead, docs/recipe.md §4). `scale` is the input's C;
  `divisors` what each site's rows were divided by, which export folds back (sae/model.py `fold`).
  """

  def __init__(self, input_source: BatchSource, target_source: BatchSource):
    ins, outs = input_source.describe(), target_source.describe()
    same = {k: (ins.get(k), outs.get(k)) for k in ("root", "rows", "seed", "batch_size", "streams")}
    if any(a != b for a, b in same.values()):
      raise ValueError(f"transcoder input and target must come from one store read alike; they differ in {same}")
    if input_source.nonfinite != "error":
      raise ValueError(
        "data.nonfinite 'skip' replaces rows per site, so input and target rows would no longer pair; "
        "use 'error' to train a transcoder"
      )
    self.input, self.target = input_source, target_source
    self.input_width, self.output_width = input_source.width, target_source.width
    self.batch_size, self.mesh = input_source.batch_size, input_source.mesh
    self.scale = input_source.scale
    self.divisors = (input_source.divisor, target_source.divisor)
    self.output_mean = target_source.mean
    self.store = input_source.store

  def batch(self, step: int) -> Batch:
    """Each site's rows, read (and prefetched) by its own source."""
    return Batch(self.input.batch(step).x_bd, self.target.batch(step).x_bd)

  def close(self) -> None:
    for source in (self.input, self.target):
      source.close()

  def describe(self) -> dict:
    inputs = self.input.describe()
    return {"kind": "paired", "rows": inputs["rows"], "input": inputs, "target": self.target.describe()}


class LayerStackSource:
  """A cross-layer transcoder's batches: `(x_bld, y_bld)`, each `[batch, L, d]`, row b holding
  every layer's MLP input and MLP output at the same row of one extraction (one source per site,
  read alike, as `PairedSource` pairs two). Each site is normalized by its own C; `divisors`
  holds them per layer, which export folds back (sae/clt.py `fold`)."""

  def __init__(self, inputs: list[SiteSource], targets: list[SiteSource]):
    sources = [*inputs, *targets]
    first = sources[0].describe()
    for source in sources[1:]:
      d = source.describe()
      if differ := {
        k: (first.get(k), d.get(k))
        for k in ("root", "rows", "seed", "batch_size", "streams")
        if first.get(k) != d.get(k)
      }:
        raise ValueError(
          f"CLT sites {first.get('site')} and {d.get('site')} must come from one store read alike; {differ}"
        )
    if any(source.nonfinite != "error" for source in sources):
      raise ValueError("data.nonfinite 'skip' replaces rows per site, so layers would no longer pair; use 'error'")
    self.inputs, self.targets = inputs, targets
    self.layers = len(inputs)
    self.batch_size, self.mesh = inputs[0].batch_size, inputs[0].mesh
    self.input_width, self.output_width = inputs[0].width, targets[0].width
    self.divisors = (np.array([s.divisor for s in inputs]), np.array([s.divisor for s in targets]))
    self.scale = float(self.divisors[0][0])
    self.output_mean = np.stack([s.mean for s in targets]).astype(np.float32)  # [L, d]
    self.store = inputs[0].store
    self.sharding = NamedSharding(self.mesh, P(DATA, None, None))

  def _stacked(self, sources: list[SiteSource], step: int) -> jax.Array:
    rows_bld = np.stack([source.rows(step) for source in sources], axis=1)
    return global_batch(rows_bld, self.sharding, (self.batch_size, *rows_bld.shape[1:]))

  def batch(self, step: int) -> tuple[jax.Array, jax.Array]:
    return self._stacked(self.inputs, step), self._stacked(self.targets, step)

  def close(self) -> None:
    for source in [*self.inputs, *self.targets]:
      source.close()

  def describe(self) -> dict:
    return {
      "kind": "layers",
      "rows": self.inputs[0].describe()["rows"],
      "inputs": [s.describe() for s in self.inputs],
      "targets": [s.describe() for s in self.targets],
    }


def open_source(
  path: str,
  batch_size: int,
  mesh: Mesh,
  seed: int,
  normalize: str | None = "raw",
  site: str | None = None,
  expected_width: int | None = None,
  **loader_options,
) -> BatchSource:
  """A source for `path`: an activation store root (local or gs://; one `site` of it) or a
  `.npy` file of `[rows, width]` activations (memory-mapped). `normalize`: "raw", "centred" or
  None (batches not divided)."""
  check_normalization(normalize)
  p = Path(path)
  if p.suffix == ".npy":
    if not p.exists():
      raise FileNotFoundError(f"data.path {path}: no such file")
    return ArraySource(np.load(p, mmap_mode="r"), batch_size, mesh, seed, normalize, name=str(p))
  if path.startswith("gs://") or p.is_dir():
    if not site:
      raise ValueError(f"data.path {path} is a store: set config.site to the site to train on")
    return StoreLoader(path, site, batch_size, mesh, seed, normalize, expected_width=expected_width, **loader_options)
  raise FileNotFoundError(f"data.path {path}: neither an activation store nor a .npy file")
