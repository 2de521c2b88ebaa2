"""Documents -> fixed-length token sequences -> global batches, with the trace of every position.

Two modes (`extract.mode`):
- `pack` (default): documents are tokenized, each followed by EOS, and concatenated; every
  sequence is BOS + the next `seq_len - 1` tokens of that stream, so no token is wasted and a
  document may continue into the next sequence (its positions keep counting).
- `truncate`: every sequence is BOS + the first `seq_len - 1` tokens of one document, padded.

Every position carries its document id and its position in that document's tokens; BOS, EOS
and padding carry document id -1 and are never stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

from scope_jax.core.choices import MODES
from scope_jax.text.tokenizer import Tokenizer


@dataclasses.dataclass
class TokenBatch:
  """A global batch of token sequences and where each token came from (extraction writes the trace)."""

  index: int  # global batch number
  tokens: np.ndarray  # [G, T] int32
  doc: np.ndarray  # [G, T] int32, -1 where nothing is stored
  pos: np.ndarray  # [G, T] int32 position in the document's tokens, -1 where nothing is stored

  @property
  def keep(self) -> np.ndarray:
    return self.doc >= 0


def _document_tokens(docs: Iterable[tuple[int, str]], tokenizer: Tokenizer):
  for doc_id, text in docs:
    ids = tokenizer.encode(text, add_bos=False)
    if ids:
      yield doc_id, np.asarray(ids, np.int32)


def sequences(
  docs: Iterable[tuple[int, str]], tokenizer: Tokenizer, seq_len: int, mode: str = "pack"
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(tokens [T], doc [T], pos [T]) per sequence."""
  if mode not in MODES:
    raise ValueError(f"extract.mode {mode!r}: expected one of {MODES}")
  if seq_len < 2:
    raise ValueError(f"extract.seq_len {seq_len}: needs at least 2 (BOS and one token)")
  body = seq_len - 1
  if mode == "truncate":
    for doc_id, ids in _document_tokens(docs, tokenizer):
      n = min(len(ids), body)
      tokens = np.full(seq_len, tokenizer.pad_id, np.int32)
      doc, pos = np.full(seq_len, -1, np.int32), np.full(seq_len, -1, np.int32)
      tokens[0], tokens[1 : n + 1], doc[1 : n + 1], pos[1 : n + 1] = tokenizer.bos_id, ids[:n], doc_id, np.arange(n)
      yield tokens, doc, pos
    return
  buffers: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
  buffered = 0
  for doc_id, ids in _document_tokens(docs, tokenizer):
    n = len(ids)
    buffers.append(
      (
        np.append(ids, tokenizer.eos_id).astype(np.int32),
        np.append(np.full(n, doc_id, np.int32), -1).astype(np.int32),
        np.append(np.arange(n, dtype=np.int32), -1).astype(np.int32),
      )
    )
    buffered += n + 1
    while buffered >= body:
      stream = [np.concatenate(parts) for parts in zip(*buffers)]
      head = [
        np.concatenate([[first], part[:body]]).astype(np.int32)
        for first, part in zip((tokenizer.bos_id, -1, -1), stream)
      ]
      yield tuple(head)
      buffers = [tuple(part[body:] for part in stream)]
      buffered -= body
  if buffered:  # the last, partial sequence, padded
    stream = [np.concatenate(parts) for parts in zip(*buffers)]
    tokens = np.full(seq_len, tokenizer.pad_id, np.int32)
    doc, pos = np.full(seq_len, -1, np.int32), np.full(seq_len, -1, np.int32)
    tokens[0] = tokenizer.bos_id
    tokens[1 : buffered + 1], doc[1 : buffered + 1], pos[1 : buffered + 1] = stream
    yield tokens, doc, pos


def batches(
  seqs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
  global_batch: int,
  pad_id: int,
  max_batches: int | None = None,
) -> Iterator[TokenBatch]:
  """Groups sequences into global batches; the last one is padded with empty sequences."""
  rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
  index = 0
  for seq in seqs:
    if max_batches is not None and index >= max_batches:
      return
    rows.append(seq)
    if len(rows) == global_batch:
      yield TokenBatch(index, *(np.stack(col) for col in zip(*rows)))
      rows, index = [], index + 1
  if rows and (max_batches is None or index < max_batches):
    seq_len = len(rows[0][0])
    while len(rows) < global_batch:
      rows.append((np.full(seq_len, pad_id, np.int32), np.full(seq_len, -1, np.int32), np.full(seq_len, -1, np.int32)))
    yield TokenBatch(index, *(np.stack(col) for col in zip(*rows)))
