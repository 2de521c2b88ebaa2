"""The text around a store row, read back through its trace (token, document, position, sequence,
column), and a latent's activation on every token of that window.

Extraction shuffles rows within buckets, so a row's neighbours in its text are found by their
trace, not by their place: the window of a row at column c of sequence s is the rows of (s, c−before)
… (s, c+after) that belong to the row's document. One sequential pass over the trace finds them
all; the activations over the windows are then computed from one read of the rows they touch,
block by block. Nothing scales with the store beyond one block at a time.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from scope_jax.activations.store import TRACE_COLUMNS, Store
from scope_jax.parallel.precision import matmul
from scope_jax.sae import SAE
from scope_jax.sae.topk import row_threshold
from scope_jax.text.tokenizer import Tokenizer

BLOCK_ROWS = 65_536
SEQ, COL, DOC, TOKEN = (TRACE_COLUMNS.index(c) for c in ("seq", "col", "doc", "token"))


@dataclasses.dataclass
class Windows:
  """Contexts of rows `rows_n` for latents `latent_n`: `[N, before + 1 + after]` arrays."""

  tokens_nw: np.ndarray  # int32 token ids (-1 outside the document or the stored rows)
  values_nw: np.ndarray  # float32 the latent's activation on each token
  center: int  # the column of the context's own row


def check_trace(store: Store) -> None:
  if store.manifest.get("trace_columns") != list(TRACE_COLUMNS):
    raise ValueError(
      f"{store.root}: the store has no trace columns {list(TRACE_COLUMNS)} (manifest trace_columns: "
      f"{store.manifest.get('trace_columns')}); the feature browser needs them to find each row's text"
    )


def _blocks(store: Store, rows: np.ndarray):
  """For each block of the store holding any of `rows` (sorted): (the indices into `rows` of those
  rows, the first and one past the last of them: the span to read)."""
  for a in range(0, store.rows, BLOCK_ROWS):
    lo, hi = np.searchsorted(rows, [a, a + BLOCK_ROWS])
    if lo < hi:
      yield np.arange(lo, hi), int(rows[lo]), int(rows[hi - 1]) + 1


def windows(
  store: Store, site: str, sae: SAE, rows_n: np.ndarray, latent_n: np.ndarray, before: int, after: int
) -> Windows:
  """The text window of each (row, latent) and the latent's activation over it (the SAE reads
  `site`'s raw rows, as `features.scan` did)."""
  check_trace(store)
  seq_len = np.int64(store.seq_len)
  offsets_w = np.arange(-before, after + 1)
  centers = np.unique(rows_n)
  center_trace = np.zeros((len(centers), len(TRACE_COLUMNS)), np.int64)
  for idx, first, last in _blocks(store, centers):
    center_trace[idx] = store.read("trace", first, last)[centers[idx] - first]
  trace_n = center_trace[np.searchsorted(centers, rows_n)]
  keys_nw = (trace_n[:, SEQ] * seq_len + trace_n[:, COL])[:, None] + offsets_w[None, :]
  needed = np.unique(keys_nw)
  row_of, token_of, doc_of = (np.full(len(needed), -1, np.int64) for _ in range(3))
  for a in range(0, store.rows, BLOCK_ROWS):  # one pass over the trace finds every window's rows
    t = store.read("trace", a, min(a + BLOCK_ROWS, store.rows)).astype(np.int64)
    k = t[:, SEQ] * seq_len + t[:, COL]
    at = np.minimum(np.searchsorted(needed, k), len(needed) - 1)
    hit = np.flatnonzero(needed[at] == k)
    row_of[at[hit]], token_of[at[hit]], doc_of[at[hit]] = a + hit, t[hit, TOKEN], t[hit, DOC]
  slot_nw = np.searchsorted(needed, keys_nw)
  row_nw, token_nw, doc_nw = row_of[slot_nw], token_of[slot_nw], doc_of[slot_nw]
  same_nw = (row_nw >= 0) & (doc_nw == trace_n[:, DOC : DOC + 1])
  same_nw &= _contiguous(same_nw, before)
  values_nw = _activations(store, site, sae, np.where(same_nw, row_nw, -1), latent_n)
  return Windows(np.where(same_nw, token_nw, -1).astype(np.int32), values_nw, before)


def _activations(store: Store, site: str, sae: SAE, row_nw: np.ndarray, latent_n: np.ndarray) -> np.ndarray:
  """float32 `[N, W]`: latent_n[i]'s activation on row row_nw[i, j] (0 where the row is -1)."""
  flat = row_nw.ravel()
  latent = np.repeat(latent_n, row_nw.shape[1])
  wanted = np.flatnonzero(flat >= 0)
  order = wanted[np.argsort(flat[wanted], kind="stable")]
  rows = flat[order]
  values = np.zeros(flat.shape, np.float32)
  w_enc_md = np.ascontiguousarray(np.asarray(sae.W_enc, np.float32).T)
  b_enc, theta = np.asarray(sae.b_enc, np.float32), np.asarray(sae.threshold, np.float32)
  topk = sae.info.activation == "topk"
  for idx, first, last in _blocks(store, rows):
    x_rd = store.read(site, first, last).astype(np.float32)
    if topk:  # a TopK latent's activation depends on its row's k-th largest pre-activation
      needed = np.unique(rows[idx]) - first
      tau_r = np.zeros(len(x_rd), np.float32)
      tau_r[needed] = _topk_thresholds(sae, x_rd[needed])
    for s in range(0, len(idx), 16_384):  # the gathered encoder rows stay small
      part = idx[s : s + 16_384]
      lat, r = latent[order[part]], rows[part] - first
      pre = np.einsum("nd,nd->n", x_rd[r], w_enc_md[lat]) + b_enc[lat]
      if topk:
        values[order[part]] = np.where((pre >= tau_r[r]) & (pre > 0), pre, 0.0)  # as SAE.encode
      else:
        values[order[part]] = np.where(pre > theta[lat], np.maximum(pre, 0.0), 0.0)  # as SAE.encode
  return values.reshape(row_nw.shape)


def _topk_thresholds(sae: SAE, x_rd: np.ndarray, rows_at_once: int = 4_096) -> np.ndarray:
  """Each row's TopK threshold (sae/topk.py `row_threshold`: the k-th largest pre-activation)."""
  out = [np.asarray(_row_threshold(sae, x_rd[a : a + rows_at_once])) for a in range(0, len(x_rd), rows_at_once)]
  return np.concatenate(out) if out else np.zeros(0, np.float32)


@jax.jit
def _row_threshold(sae: SAE, x_rd: jax.Array) -> jax.Array:
  return row_threshold(matmul(x_rd, sae.W_enc) + sae.b_enc, sae.info.k)


def _contiguous(mask_nw: np.ndarray, c: int) -> np.ndarray:
  """Only the run of True around column c (a window never skips over a gap)."""
  left = np.cumprod(mask_nw[:, c::-1], axis=1)[:, ::-1]
  right = np.cumprod(mask_nw[:, c:], axis=1)
  return np.concatenate([left[:, :-1], right], axis=1).astype(bool)


class TokenText:
  """Token ids -> the strings shown for them, whose concatenation is the tokenizer's decoding."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    sp = tokenizer.sp
    self.pieces = [sp.IdToPiece(i).replace("\u2581", " ") for i in range(sp.GetPieceSize())]

  def strings(self, ids) -> list[str]:
    ids = [int(i) for i in ids]
    out = [self.pieces[i] for i in ids]
    joined, decoded = "".join(out), self.tokenizer.decode(ids)
    if joined == decoded:
      return out
    if out and out[0].startswith(" ") and joined[1:] == decoded:  # a dummy-prefix tokenizer drops the leading space
      return [out[0][1:], *out[1:]]
    return self.by_prefix(ids)

  def by_prefix(self, ids: list[int]) -> list[str]:
    """Each token's string as what it adds to the decoded prefix (byte pieces <0xE2>… or
    normalization; a token completing a multi-byte character shows the whole character): one
    decode per token, where `strings` needs one per window."""
    out, shown = [], ""
    for i in range(len(ids)):
      prefix = self.tokenizer.decode(ids[: i + 1])
      grows = prefix.startswith(shown) and "\ufffd" not in prefix[len(shown) :]
      out.append(prefix[len(shown) :] if grows else "")
      shown = prefix if grows else shown
    out[-1] += self.tokenizer.decode(ids)[len(shown) :]
    return out
