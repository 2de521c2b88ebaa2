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
from scope_jax.layout import check_writable, record_file
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


def _summary(score: np.ndarray) -> dict:
  return {
    "median": float(np.median(score)),
    "mean": float(np.mean(score)),
    "above_0.7": float(np.mean(score > 0.7)),
    "scores": [round(float(v), 4) for v in score],
  }


def adjacent_matches(saes: list[SAE], store: Store | None = None, rows: int = 0, progress: bool = True) -> list[dict]:
  """SAEs at consecutive depths (sorted by their sites' layers), each matched one-to-one to the
  next: by decoder cosine, and by activation correlation where `store` holds both sites."""
  from scope_jax.models.sites import parse_site

  if any(s.info.site is None for s in saes):
    raise ValueError("every SAE must say its site (a file with a hook name, or load_sae(path, site=...))")
  saes = sorted(saes, key=lambda s: parse_site(s.info.site).layer)
  out = []
  for first, second in zip(saes, saes[1:]):
    entry = {"from": first.info.site, "to": second.info.site}
    entry["decoder"] = _summary(assign(decoder_cosines(first, second)).score)
    if store is not None and {first.info.site, second.info.site} <= set(store.sites):
      corr = activation_correlations(store, first, first.info.site, second, second.info.site, rows, progress=progress)
      by_activation, by_decoder = assign(corr), assign(decoder_cosines(first, second))
      entry["activation"] = _summary(by_activation.score)
      entry["agreement"] = float(
        np.mean(by_activation.b[np.argsort(by_activation.a)] == by_decoder.b[np.argsort(by_decoder.a)])
      )
    out.append(entry)
  return out


def write_match_report(entries: list[dict], out) -> dict:
  """matches.json, matches.md and matching.png (each pair's score distribution; the median
  against depth) in `out`; returns their paths."""
  import json
  from pathlib import Path

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out = Path(out)
  files = {"json": out / "matches.json", "markdown": out / "matches.md", "plot": out / "matching.png"}
  for file in files.values():  # the user's own files of these names are never overwritten
    check_writable(file)
  out.mkdir(parents=True, exist_ok=True)
  (out / "matches.json").write_text(json.dumps(entries, indent=1) + "\n")
  measures = [m for m in ("decoder", "activation") if any(m in e for e in entries)]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
  for e in entries:
    axes[0].hist(e["decoder"]["scores"], bins=40, range=(-0.2, 1), histtype="step", label=f"{e['from']} → {e['to']}")
  axes[0].set_xlabel("decoder cosine of matched latents")
  axes[0].set_ylabel("latents")
  axes[0].legend(fontsize=7)
  for m in measures:
    pairs = [e for e in entries if m in e]
    axes[1].plot([e["from"] for e in pairs], [e[m]["median"] for e in pairs], marker="o", label=f"median {m} score")
  axes[1].set_xlabel("from site (matched to the next layer)")
  axes[1].set_ylim(0, 1)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "matching.png")
  plt.close(fig)
  header = "| from | to | decoder cos median | > 0.7 | activation corr median | > 0.7 | same match |"
  lines = ["# Latents matched across adjacent layers", "", header, "|---|---|---|---|---|---|---|"]
  for e in entries:
    act = e.get("activation")
    cells = [
      e["from"],
      e["to"],
      f"{e['decoder']['median']:.3f}",
      f"{e['decoder']['above_0.7']:.1%}",
      f"{act['median']:.3f}" if act else "—",
      f"{act['above_0.7']:.1%}" if act else "—",
      f"{e['agreement']:.1%}" if act else "—",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  (out / "matches.md").write_text("\n".join(lines + ["", "![matching](matching.png)"]) + "\n")
  for file in files.values():
    record_file(file)
  return files
