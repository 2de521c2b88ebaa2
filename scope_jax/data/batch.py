"""What a step's rows are (`Batch`) and what a source of them answers (`BatchSource`)."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from scope_jax.data.batcher import global_batch


class Batch(NamedTuple):
  """One step's rows (a pytree: the step is jitted and sharded over it). `y_bd` None: the rows
  are reconstructed, not predicted (an SAE's batch)."""

  x_bd: jax.Array  # [batch, d_in] what the encoder reads
  y_bd: jax.Array | None = None  # [batch, d_out] what a transcoder predicts

  @property
  def targets_bd(self) -> jax.Array:
    """What the decoder's output is compared with: the target rows, or the input rows themselves."""
    return self.x_bd if self.y_bd is None else self.y_bd


class BatchSource(Protocol):
  """Everything the trainer and export ask of their data."""

  batch_size: int
  mesh: Mesh  # the batches are sharded over its `data` axis
  input_width: int  # d_in
  output_width: int  # d_out: what is reconstructed (d_in for an SAE)
  scale: float  # C of the input (data/normalization.py)
  divisors: tuple[float, float | None]  # what the input's rows and a transcoder's target rows were divided by
  output_mean: np.ndarray  # μ / C of what is reconstructed, [d_out] float32, in training units (b_dec's start)
  store: object | None  # the activation store read (activations/store.py), for provenance; None for an array

  def batch(self, step: int) -> Batch:
    """Rows of step `step`, float32, each site divided by its C when normalizing."""

  def describe(self) -> dict:
    """JSON-able identity of the data, checked when a run resumes."""

  def close(self) -> None:
    """Stops any background reading."""


class SiteSource:
  """What a source of one site's rows (an SAE's data) answers like every other one: it needs
  `width`, `mean`, `divisor` (C, or 1 when not normalizing), `batch_size`, `sharding` and
  `local_rows(step)` or `rows(step)`."""

  store = None
  nonfinite = "error"  # what a row holding NaN or Inf does (data/chunks.py NONFINITE)

  @property
  def input_width(self) -> int:
    return self.width

  @property
  def output_width(self) -> int:
    return self.width

  @property
  def output_mean(self) -> np.ndarray:
    return self.mean

  @property
  def divisors(self) -> tuple[float, None]:
    return self.divisor, None

  def rows(self, step: int) -> np.ndarray:
    return self.local_rows(step)

  def batch(self, step: int) -> Batch:
    return Batch(global_batch(self.rows(step), self.sharding, (self.batch_size, self.width)))

  def close(self) -> None:
    pass
