"""Per-SAE evaluation statistics, accumulated per sequence over batches (docs/recipe.md §5).

    L0    = mean number of active latents per token
    MSE   = mean ||x - xhat||²
    FVU   = E||x - xhat||² / E||x - E[x]||²
    Δ loss = CE(spliced) - CE(clean), over predictions of text tokens
    density of latent i = fraction of tokens on which it fires; dead: never fires on the eval
    set; dense: fires on more than DENSE_ABOVE of tokens

Standard errors are over sequences: tokens of one sequence are not independent, sequences nearly
are. A metric that is a total over tokens divided by a count, R = Σ_j a_j / Σ_j n_j over
sequences j, gets the ratio estimator's standard error
    SE(R) = sqrt(J / (J - 1) · Σ_j (a_j - R·n_j)²) / Σ_j n_j
which is std(a_j / n) / sqrt(J) when every sequence has the same n. FVU's denominator (the
site's variance over all eval tokens) is taken as fixed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from scope_jax.parallel.mesh import host_array
from scope_jax.sae.model import SAE

DENSE_ABOVE = 0.1


def ratio_and_standard_error(numerator_j: np.ndarray, count_j: np.ndarray) -> tuple[float, float]:
  """(Σ a_j / Σ n_j, its standard error over the J sequences with n_j > 0)."""
  a, n = np.asarray(numerator_j, np.float64), np.asarray(count_j, np.float64)
  a, n = a[n > 0], n[n > 0]
  if len(n) == 0:
    raise ValueError("no evaluation tokens: every position was a special token")
  ratio = float(a.sum() / n.sum())
  if len(n) < 2:
    return ratio, float("nan")
  return ratio, float(np.sqrt(len(n) / (len(n) - 1) * np.sum(np.square(a - ratio * n))) / n.sum())


@jax.jit
def site_sums(act_btd: jax.Array, keep_bt: jax.Array) -> dict[str, jax.Array]:
  """Sums over text positions of one batch of a site's activations (for its mean and variance)."""
  x_btd = act_btd.astype(jnp.float32) * keep_bt[..., None]
  return {
    "n": jnp.sum(keep_bt, dtype=jnp.float32),
    "sum_d": jnp.sum(x_btd, axis=(0, 1)),
    "sum_sq": jnp.sum(jnp.square(x_btd)),
  }


@jax.jit
def sae_batch(
  sae: SAE, act_btd: jax.Array, keep_bt: jax.Array, input_btd: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(the site's activation with the SAE's reconstruction spliced in at every position but BOS,
  per-sequence sums over text positions). A transcoder predicts the site's activation from
  `input_btd` (its input site's). The SAE is a traced argument: one compilation serves every SAE
  of a shape."""
  x_btd = act_btd.astype(sae.W_enc.dtype)
  in_btd = x_btd if input_btd is None else input_btd.astype(sae.W_enc.dtype)
  f_btm = sae.encode(in_btd)
  recon_btd = sae.decode(f_btm) + sae.skip(in_btd)
  keep = keep_bt.astype(jnp.float32)
  err_bt = jnp.sum(jnp.square((recon_btd - x_btd).astype(jnp.float32)), axis=-1)
  active_btm = (f_btm > 0).astype(jnp.float32)
  sums = {
    "sq_err_b": jnp.sum(err_bt * keep, axis=1),
    "active_b": jnp.sum(jnp.sum(active_btm, -1) * keep, axis=1),
    "fires_m": jnp.einsum("btm,bt->m", active_btm, keep),
  }
  return act_btd.at[:, 1:].set(recon_btd[:, 1:].astype(act_btd.dtype)), sums


@dataclasses.dataclass
class SiteStats:
  """Running sums of a site's activations over text positions."""

  n: float = 0.0
  sum_d: np.ndarray | float = 0.0
  sum_sq: float = 0.0

  def add(self, act_btd: jax.Array, keep_bt) -> None:
    s = {k: host_array(v).astype(np.float64) for k, v in site_sums(act_btd, keep_bt).items()}
    self.n, self.sum_d, self.sum_sq = self.n + float(s["n"]), self.sum_d + s["sum_d"], self.sum_sq + float(s["sum_sq"])

  @property
  def mean(self) -> np.ndarray:
    return self.sum_d / self.n

  @property
  def variance(self) -> float:
    """E||x - E[x]||², FVU's denominator."""
    return self.sum_sq / self.n - float(self.mean @ self.mean)


@dataclasses.dataclass
class SAEStats:
  """Per-sequence sums over evaluation tokens for one SAE (from `sae_batch`)."""

  sq_err: list = dataclasses.field(default_factory=list)
  active: list = dataclasses.field(default_factory=list)
  tokens: list = dataclasses.field(default_factory=list)
  fires_m: np.ndarray | float = 0.0

  def add(self, sums: dict[str, jax.Array], tokens_b: np.ndarray) -> None:
    """`tokens_b`: text tokens per sequence of the batch (the padded rows beyond it are dropped)."""
    b = len(tokens_b)
    self.sq_err.append(host_array(sums["sq_err_b"])[:b].astype(np.float64))
    self.active.append(host_array(sums["active_b"])[:b].astype(np.float64))
    self.tokens.append(np.asarray(tokens_b, np.float64))
    self.fires_m = self.fires_m + host_array(sums["fires_m"]).astype(np.float64)

  def result(self, variance: float) -> dict:
    tokens = np.concatenate(self.tokens)
    mse, mse_se = ratio_and_standard_error(np.concatenate(self.sq_err), tokens)
    density_m = self.fires_m / tokens.sum()
    return {
      "tokens": int(tokens.sum()),
      "l0": float(np.concatenate(self.active).sum() / tokens.sum()),
      "mse": mse,
      "fvu": mse / variance,
      "fvu_se": mse_se / variance,
      "dead_fraction": float(np.mean(density_m == 0)),
      "dense_fraction": float(np.mean(density_m > DENSE_ABOVE)),
      "density": density_m,
    }


def log10_density_histogram(density_m: np.ndarray, bins: int = 40) -> tuple[np.ndarray, np.ndarray, int]:
  """(counts, bin edges) of log10 firing density over latents that fire, and the dead count."""
  alive = density_m[density_m > 0]
  counts, edges = (
    np.histogram(np.log10(alive), bins=bins) if len(alive) else (np.zeros(bins), np.linspace(-8, 0, bins + 1))
  )
  return counts, edges, int(np.sum(density_m == 0))
