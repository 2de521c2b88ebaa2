"""`scope-jax extract`: text -> sharded Gemma forward -> the activation store.

Three stages overlap: a thread tokenizes and batches the next sequences, the main thread runs
the forward (stopping after the deepest site), a writer thread moves the previous batch's
activations to the host, buffers its process's rows and flushes write buckets. Both queues are
bounded, so memory stays at a few batches plus one bucket.

Every process runs the same program: it tokenizes the same stream, joins the same sharded
forward, and writes only the rows its own devices computed, into its own shards. The batch is
split into `extract.shards` equal blocks of sequences, one per shard; with that number fixed the
store's content does not depend on how many processes wrote it. Process 0 writes config.json
first and manifest.json last, once every shard is finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from scope_jax.activations.store import CONFIG, KV, MANIFEST, TRACE_COLUMNS, StoreError, write_manifest
from scope_jax.activations.writer import ShardWriter, ledger_batches
from scope_jax.core.choices import DTYPES
from scope_jax.layout import RunLayout, differences
from scope_jax.lease import holding
from scope_jax.models.sites import parse_site, site_width
from scope_jax.parallel.interrupt import CtrlC
from scope_jax.parallel.mesh import make_mesh, owned_blocks
from scope_jax.parallel.prefetch import BackgroundWorker, prefetch_iterator
from scope_jax.text.sequences import batches, sequences
from scope_jax.text.sources import iter_documents


def store_root(config: ml_collections.ConfigDict, workdir: str | Path) -> str:
  return config.extract.store or str(RunLayout(workdir).activations)


def kept_documents(config: ml_collections.ConfigDict):
  """The documents extraction reads: all but the held-out ones (id % holdout_every == 0)."""
  every = config.data.holdout_every
  for doc_id, text in iter_documents(list(config.data.text), config.data.text_field):
    if not (every and doc_id % every == 0):
      yield doc_id, text


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def store_identity(config: ml_collections.ConfigDict, lm) -> dict:
  """Everything that decides the store's content; a resumed run must match it exactly."""
  e = config.extract
  if e.dtype not in DTYPES:
    raise ValueError(f"extract.dtype {e.dtype!r}: expected one of {DTYPES}")
  sites = [parse_site(s, lm.config) for s in config.sites]
  if not sites:
    raise ValueError("config.sites is empty: list the sites to extract, e.g. ['res.6']")
  model_config = json.dumps(dataclasses.asdict(lm.config), sort_keys=True, default=list).encode()
  return {
    "model": config.model,
    "model_config_sha256": _sha256(model_config),
    "tokenizer_sha256": _sha256(lm.tokenizer.model_proto),
    "sites": [s.name for s in sites],
    "widths": {s.name: site_width(s, lm.config) for s in sites},
    "dtype": e.dtype,
    "seq_len": e.seq_len,
    "mode": e.mode,
    "batch_size": e.batch_size,
    "max_batches": max_batches(config),
    "bucket_rows": e.bucket_rows,
    "chunk_rows": e.chunk_rows,
    "seed": config.seed,
    "text": list(config.data.text),
    "text_field": config.data.text_field,
    "holdout_every": config.data.holdout_every,
    "shards": config.extract.shards or jax.process_count(),
  }


def max_batches(config: ml_collections.ConfigDict) -> int | None:
  e = config.extract
  return math.ceil(e.tokens / (e.batch_size * (e.seq_len - 1))) if e.tokens else None


def _local_rows(batch, acts: dict[str, jax.Array]) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """This process's stored rows of one batch: `{site: [n, width]}` and the trace `[n, 5]`."""
  first = next(iter(acts.values()))
  slices = sorted({s.index[0].indices(first.shape[0])[:2] for s in first.addressable_shards if s.replica_id == 0})
  out: dict[str, list[np.ndarray]] = {site: [] for site in acts}
  traces = []
  for lo, hi in slices:
    keep = batch.keep[lo:hi]
    for site, arr in acts.items():
      shard = next(s for s in arr.addressable_shards if s.replica_id == 0 and s.index[0].indices(arr.shape[0])[0] == lo)
      out[site].append(np.asarray(shard.data)[keep])
    g, t = np.nonzero(keep)
    seq = batch.index * first.shape[0] + lo + g
    traces.append(
      np.stack([batch.tokens[lo:hi][keep], batch.doc[lo:hi][keep], batch.pos[lo:hi][keep], seq, t], axis=1).astype(
        np.int32
      )
    )
  return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(traces)


def committed_rows(writers: dict[int, ShardWriter]) -> int:
  """The rows this process's shards have committed (each shard's ledger, updated at every flush)."""
  return sum(w.ledger["rows"] for w in writers.values())


def load_extraction_model(config: ml_collections.ConfigDict):
  from scope_jax.models.lm import load_model

  dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[config.model_dtype]
  mesh = make_mesh(config.model_mesh.data, config.model_mesh.model)
  return load_model(config.model, dtype=dtype, mesh=mesh, precision=config.precision)


def extract(config: ml_collections.ConfigDict, workdir: str | Path, lm=None, progress: bool = True) -> dict:
  """Runs (or resumes, or confirms) the extraction, holding the store's lease; returns a summary dict."""
  root = store_root(config, workdir)
  with holding(root, "store"):
    return _extract(config, root, lm, progress)


def _extract(config: ml_collections.ConfigDict, root: str, lm, progress: bool) -> dict:
  kv = KV(root)
  lm = lm or load_extraction_model(config)
  if lm.tokenizer is None:
    raise ValueError(f"model {config.model}: no tokenizer found; extraction needs one")
  identity = store_identity(config, lm)
  existing = kv.read_json(CONFIG)
  if existing is not None and (diffs := differences(existing, identity)):
    raise StoreError(
      f"{root} was made with another config; differing fields:\n  "
      + "\n  ".join(diffs)
      + "\nuse another store (extract.store or --workdir) or restore the old config"
    )
  if (manifest := kv.read_json(MANIFEST)) is not None:
    return {
      "root": root,
      "already_finished": True,
      "rows": manifest["rows"],
      "rows_per_shard": manifest["rows_per_shard"],
    }
  process = jax.process_index()
  if next(kept_documents(config), None) is None:
    raise ValueError(
      f"no documents in data.text {list(config.data.text)} (after holdout_every="
      f"{config.data.holdout_every}); nothing to extract"
    )
  if existing is None and process == 0:
    kv.check_empty()
    kv.probe()
    kv.write_json(CONFIG, identity)
  multihost_utils.sync_global_devices("scope_jax extract: config written")

  e = config.extract
  global_batch = e.batch_size
  if global_batch % lm.mesh.shape["data"]:
    raise ValueError(
      f"extract.batch_size {global_batch} is not divisible by the mesh's data axis ({lm.mesh.shape['data']})"
    )
  shards = identity["shards"]
  owned = owned_blocks(lm.mesh, global_batch, shards, "extract.shards")
  sequences_per_shard = global_batch // shards
  writers = {
    k: ShardWriter(kv, k, identity["sites"], identity["widths"], e.dtype, e.chunk_rows, config.seed, workers=e.workers)
    for k in owned
  }
  bucket_batches = max(1, math.ceil(e.bucket_rows / (sequences_per_shard * (e.seq_len - 1))))
  start = min(ledger_batches(kv, shards))
  for writer in writers.values():
    writer.rewind(start)
    writer.verify()
  summary = {"root": root, "already_finished": False, "resumed_at_batch": start}
  t0, tokens_seen = time.perf_counter(), 0
  if not all(w.ledger["finished"] for w in writers.values()):
    limit = max_batches(config)
    stream = batches(
      sequences(kept_documents(config), lm.tokenizer, e.seq_len, e.mode), global_batch, lm.tokenizer.pad_id, limit
    )
    bar = tqdm(
      total=limit,
      initial=start,
      unit="batch",
      desc=f"extract {','.join(identity['sites'])}",
      disable=not progress or process != 0,
    )

    def write(item):
      batch, acts = item
      rows, trace = _local_rows(batch, acts)
      shard_of_row = trace[:, TRACE_COLUMNS.index("seq")] % global_batch // sequences_per_shard
      for k, writer in writers.items():
        mine = shard_of_row == k
        writer.add({site: r[mine] for site, r in rows.items()}, trace[mine])
        if (batch.index + 1) % bucket_batches == 0:
          writer.flush(batch.index + 1)

    worker = BackgroundWorker(write, maxsize=2, name="extraction writer")
    worker.start()
    done = start
    try:
      with CtrlC() as ctrl_c:
        for batch in prefetch_iterator((b for b in stream if b.index >= start), depth=2, name="tokenizer"):
          acts = lm.activations(batch.tokens, identity["sites"])
          worker.put((batch, acts))
          done = batch.index + 1
          tokens_seen += int(batch.keep.sum())
          bar.update(1)
          bar.set_postfix_str(
            f"{tokens_seen / (time.perf_counter() - t0):,.0f} tok/s, {committed_rows(writers):,} rows committed"
          )
          ctrl_c.check()  # between batches: what was written so far is resumed from
    finally:
      try:
        worker.finish()
      finally:
        bar.close()
    for writer in writers.values():
      writer.flush(done, finished=True)
  for writer in writers.values():
    writer.close()
  multihost_utils.sync_global_devices("scope_jax extract: shards finished")
  seconds = time.perf_counter() - t0
  if process == 0:
    write_manifest(kv, identity, shards, model_source=lm.source)
  multihost_utils.sync_global_devices("scope_jax extract: manifest written")
  return summary | {
    "rows": committed_rows(writers),
    "tokens_processed": tokens_seen,
    "seconds": seconds,
    "tokens_per_s": tokens_seen / seconds if seconds else 0.0,
  }
