"""The normalization scalar C (docs/recipe.md §3) and the statistics it is computed from.

C is chosen one of two ways (`recipe.normalize`):
- "raw" (Gemma Scope): E||x / C||² = 1;
- "centred": E||(x - μ) / C||² = 1, μ the site's mean. Where the activations carry a large
  constant offset (Gemma 3's residual stream: ~88% of E||x||² at res.6 of the 270M), "raw" makes
  C mostly measure the offset, so every λ acts several times stronger than the same λ in Gemma
  Scope's setting; "centred" measures the part an SAE has to explain.
Either way the trainer starts `b_dec` at μ / C (`mean`), so no latent is spent on the offset.
"""

from __future__ import annotations

import numpy as np

from scope_jax.core.choices import NORMALIZATIONS


def check_normalization(how: str | None) -> None:
  if how is not None and how not in NORMALIZATIONS:
    raise ValueError(f"recipe.normalize {how!r}: expected one of {NORMALIZATIONS}")


def normalization_scale(mean_sq_norm: float, mean_d: np.ndarray, how: str = "raw", name: str = "activations") -> float:
  """C with E||x / C||² = 1 ("raw") or E||(x - μ) / C||² = 1 ("centred"), from E||x||² and μ."""
  check_normalization(how)
  second_moment = mean_sq_norm - float(np.dot(mean_d, mean_d)) if how == "centred" else mean_sq_norm
  if not np.isfinite(second_moment) or second_moment <= 0:
    what = "variance (E||x - μ||²)" if how == "centred" else "mean squared norm"
    raise ValueError(f"{name}: the activations have {what} {second_moment}; cannot normalize")
  return float(np.sqrt(second_moment))


def scale_and_mean(
  mean_sq_norm: float, mean_d: np.ndarray, normalize: str | None, name: str = "activations"
) -> tuple[float, float, np.ndarray]:
  """(C, the divisor batches get: C or 1 when `normalize` is None, μ / divisor as float32); `name`
  (the data's file or store and site) is what an error names."""
  scale = normalization_scale(mean_sq_norm, mean_d, normalize or "raw", name)
  divisor = scale if normalize else 1.0
  return scale, divisor, (np.asarray(mean_d) / divisor).astype(np.float32)


def array_statistics(rows_nd: np.ndarray, name: str = "array", chunk_rows: int = 65_536) -> tuple[float, np.ndarray]:
  """(E||x||², μ) over every row, in float64, streamed in chunks (the store's manifest has the same).
  Rows holding NaN or Inf are an error naming `name`, how many and the first."""
  sq, total, bad, first_bad = 0.0, np.zeros(rows_nd.shape[1], np.float64), 0, None
  for lo in range(0, rows_nd.shape[0], chunk_rows):
    block = np.asarray(rows_nd[lo : lo + chunk_rows], np.float64)
    if not np.isfinite(block_sq := float(np.sum(np.square(block)))):
      rows_bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
      bad, first_bad = bad + len(rows_bad), first_bad if first_bad is not None else lo + int(rows_bad[0])
    sq += block_sq
    total += block.sum(axis=0)
  if bad:
    raise ValueError(
      f"{name}: {bad} of {rows_nd.shape[0]} rows hold NaN or Inf (the first: row {first_bad}); "
      "expected finite activations"
    )
  return sq / rows_nd.shape[0], total / rows_nd.shape[0]
