"""Latents of two SAEs related to each other: one-to-one matches (the same feature at adjacent
layers, Gemma Scope's §5 question) and parent -> children trees (a narrow SAE's latent split
into several of a wider one at the same site).

Two measures: decoder cosine (the directions the latents write) and, for SAEs read on the same
tokens, the Pearson correlation of their activations over the store's rows, which are aligned
across the sites of one extraction (row r is the same token at every site). Matches are the
assignment that maximizes the summed measure (`scipy.optimize.linear_sum_assignment`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from scope_jax.activations.store import Store
from scope_jax.sae import SAE


@dataclasses.dataclass
class Matches:
  """Latent `a[i]` of the first SAE matched to latent `b[i]` of the second, with its score."""

  a: np.ndarray
  b: np.ndarray
  score: np.ndarray


def decoder_cosines(first: SAE, second: SAE) -> np.ndarray:
  """float32 `[M1, M2]` cosines between the two SAEs' decoder rows."""
  if first.W_dec.shape[-1] != second.W_dec.shape[-1]:
    raise ValueError(
      f"cannot compare decoder directions of width {first.W_dec.shape[-1]} ({first.info.site or 'first SAE'}) "
      f"and {second.W_dec.shape[-1]} ({second.info.site or 'second SAE'}): the SAEs write spaces of different sizes"
    )
  a, b = (np.asarray(s.W_dec, np.float32) for s in (first, second))
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  return a @ b.T


def assign(score_ab: np.ndarray) -> Matches:
  """The one-to-one matching of largest total score (min(M1, M2) pairs)."""
  rows, cols = linear_sum_assignment(score_ab, maximize=True)
  return Matches(rows, cols, score_ab[rows, cols])


@jax.jit
def _moments(first: SAE, second: SAE, x_a, x_b):
  f_a, f_b = first.encode(x_a), second.encode(x_b)
  return f_a.sum(0), f_b.sum(0), (f_a * f_a).sum(0), (f_b * f_b).sum(0), f_a.T @ f_b


def activation_correlations(
  store: Store, first: SAE, site_a: str, second: SAE, site_b: str, rows: int = 0, chunk_rows: int = 8_192, progress=True
) -> np.ndarray:
  """float32 `[M1, M2]` Pearson correlations of the two SAEs' activations on the same tokens: the
  store's rows of `site_a` and `site_b` (one extraction: row r is one token at every site),
  streamed in chunks (only the `[M1, M2]` sums are kept). A latent that never fires correlates 0."""
  for sae, site in ((first, site_a), (second, site_b)):
    if sae.d_in != store.width(site):
      raise ValueError(
        f"an SAE of input width {sae.d_in} cannot read site {site} of {store.root} (width {store.width(site)})"
      )
  n = store.rows if not rows else min(rows, store.rows)
  sums = None
  with tqdm(total=n, desc=f"correlate {site_a} and {site_b}", unit="row", unit_scale=True, disable=not progress) as bar:
    for start in range(0, n, chunk_rows):
      stop = min(start + chunk_rows, n)
      part = _moments(first, second, *(jnp.asarray(store.read(s, start, stop), jnp.float32) for s in (site_a, site_b)))
      part = [np.asarray(p, np.float64) for p in part]
      sums = part if sums is None else [s + p for s, p in zip(sums, part)]
      bar.update(stop - start)
  s_a, s_b, ss_a, ss_b, s_ab = sums
  cov = s_ab / n - np.outer(s_a / n, s_b / n)
  std_a, std_b = (np.sqrt(np.maximum(ss / n - (s / n) ** 2, 0.0)) for s, ss in ((s_a, ss_a), (s_b, ss_b)))
  denom = np.outer(std_a, std_b)
  return np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), 0.0).astype(np.float32)


def children(parent: SAE, child: SAE, k: int = 4, min_cosine: float = 0.5) -> list[list[tuple[int, float]]]:
  """For each latent of `parent` (narrower), the latents of `child` (wider, same site) whose decoder
  direction is nearest it, at most `k`, cosine at least `min_cosine`: [(child latent, cosine), ...],
  most similar first. Every child latent is given to the one parent it is nearest, so the
  children form a forest (a latent of the wide SAE has at most one parent)."""
  cos = decoder_cosines(parent, child)
  nearest_parent = np.argmax(cos, axis=0)
  out = []
  for p in range(cos.shape[0]):
    mine = np.flatnonzero((nearest_parent == p) & (cos[p] >= min_cosine))
    mine = mine[np.argsort(-cos[p, mine], kind="stable")][:k]
    out.append([(int(c), float(cos[p, c])) for c in mine])
  return out
