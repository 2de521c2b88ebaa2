"""The tests' way to a sweep's state and step: the product's assembly (`scope_jax.train.run.build`)."""

from __future__ import annotations

import numpy as np

from scope_jax.core.kinds import kind_named
from scope_jax.data.batch import Batch
from scope_jax.train import run, stacked


def build_step(
  base_seed,
  mean,
  groups,
  recipe,
  mesh,
  batch,
  latent_block=0,
  steps=0,
  capacities=(),
  kind="sae",
  d_in=None,
  precision="float32",
  free_bytes=None,
):
  """(init, shardings, step_fn) of the sweep, through `run.build` as training builds it. `mean`:
  the mean of the batch's columns (a transcoder's: its input's `d_in`, then its target's)."""
  kind = kind_named(kind)
  mean = np.asarray(mean, np.float32)[d_in:] if kind.transcoder else mean
  sweep = stacked.Sweep(tuple(groups), recipe, batch, kind, base_seed, latent_block, steps, precision)
  built = run.build(sweep, mesh, mean, d_in, free_bytes)
  step_fn = built.make_step(tuple(capacities))
  return built.init, built.shardings, lambda state, rows: step_fn(state, as_batch(rows, kind.transcoder, d_in))


def as_batch(rows, transcoder: bool = False, d_in: int | None = None) -> Batch:
  """The tests' rows as the step's `Batch`: a transcoder's written as its input's `d_in` columns, then its target's."""
  if isinstance(rows, Batch):
    return rows
  return Batch(rows[:, :d_in], rows[:, d_in:]) if transcoder else Batch(rows)
