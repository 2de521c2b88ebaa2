"""Per-SAE evaluation statistics, accumulated over batches of activations (RECIPE §5).

    L0    = mean number of active latents per token
    MSE   = mean ||x - xhat||²
    FVU   = E||x - xhat||² / E||x - E[x]||²
    density of latent i = fraction of tokens on which it fires; dead: never fires on the eval
    set; dense: fires on more than DENSE_ABOVE of tokens
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from scope_jax.sae.model import SAE

DENSE_ABOVE = 0.1


@jax.jit
def _batch_sums(sae: SAE, x_nd: jax.Array) -> dict[str, jax.Array]:
  x_nd = x_nd.astype(sae.W_enc.dtype)
  f_nm = sae.encode(x_nd)
  err_nd = (sae.decode(f_nm) - x_nd).astype(jnp.float32)
  x32 = x_nd.astype(jnp.float32)
  return {"sq_err": jnp.sum(jnp.square(err_nd)), "active": jnp.sum(f_nm > 0, dtype=jnp.float32),
          "fires_m": jnp.sum(f_nm > 0, axis=0, dtype=jnp.float32), "sum_x_d": jnp.sum(x32, axis=0),
          "sum_sq_x": jnp.sum(jnp.square(x32))}


@dataclasses.dataclass
class SAEStats:
  """Running sums over evaluation tokens for one SAE."""
  n: int = 0
  sums: dict | None = None

  def add(self, sae: SAE, x_nd) -> None:
    """Adds a batch of activations `[n, d]` (special tokens already removed)."""
    if len(x_nd) == 0:
      return
    batch = {k: np.asarray(v, np.float64) for k, v in _batch_sums(sae, jnp.asarray(x_nd)).items()}
    self.sums = batch if self.sums is None else {k: self.sums[k] + batch[k] for k in batch}
    self.n += len(x_nd)

  def result(self) -> dict:
    if not self.n:
      raise ValueError("no evaluation tokens: every position was a special token")
    s, n = self.sums, self.n
    mean_d = s["sum_x_d"] / n
    variance = s["sum_sq_x"] / n - float(mean_d @ mean_d)
    density_m = s["fires_m"] / n
    mse = s["sq_err"] / n
    return {"tokens": n, "l0": s["active"] / n, "mse": mse, "fvu": mse / variance,
            "dead_fraction": float(np.mean(density_m == 0)), "dense_fraction": float(np.mean(density_m > DENSE_ABOVE)),
            "density": density_m}


def log10_density_histogram(density_m: np.ndarray, bins: int = 40) -> tuple[np.ndarray, np.ndarray, int]:
  """(counts, bin edges) of log10 firing density over latents that fire, and the dead count."""
  alive = density_m[density_m > 0]
  counts, edges = np.histogram(np.log10(alive), bins=bins) if len(alive) else (np.zeros(bins), np.linspace(-8, 0, bins + 1))
  return counts, edges, int(np.sum(density_m == 0))
