"""The activation store: zarr3 arrays written through tensorstore, on local disk or GCS.

    ROOT/config.json                  what the store is (checked when a run resumes)
    ROOT/manifest.json                written by process 0 once every shard is finished
    ROOT/shards/K/ledger.json         shard K (extract.shards; one process writes it): flushes, statistics, finished
    ROOT/shards/K/SITE/               zarr3 float32|bfloat16 [rows, width] (chunks [chunk_rows, width], CRC-32C each)
    ROOT/shards/K/trace/              zarr3 int32 [rows, 5]: TRACE_COLUMNS of every row

    ROOT/LEASE                        the extraction writing it (lease.py)

Row r of a shard is the same token in every site array and in `trace`. A store is finished
(immutable, readable) exactly when manifest.json exists. Every chunk carries a CRC-32C checked
on every read, and a resumed extraction re-reads its committed rows before it seals the store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorstore as ts

from scope_jax.layout import gcs_hint, kvstore_spec, remote_timeout, some_names

TRACE_COLUMNS = ("token", "doc", "pos", "seq", "col")  # token id, document, position in it, sequence, column
MANIFEST, CONFIG, LEDGER = "manifest.json", "config.json", "ledger.json"
# Every site array's codecs: little-endian rows, then a CRC-32C of them (4 bytes, little-endian).
CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
DEFAULT_KEYS = ({"name": "default"}, {"name": "default", "configuration": {"separator": "/"}})  # chunk files c/<i>/<j>


class StoreError(RuntimeError):
  """A store that cannot be used as asked (unfinished, unreachable, made by another config)."""


def _child(spec: dict, key: str) -> dict:
  return {**spec, "path": spec["path"] + key}


class KV:
  """JSON and bytes under a store root."""

  def __init__(self, root: str):
    self.root = root
    self.spec = kvstore_spec(root)
    self._kv = ts.KvStore.open(self.spec).result()

  def read_json(self, key: str, timeout: float | None = None) -> dict | None:
    """`key`'s JSON, or None when missing; a gs:// root gets config.storage's time to answer."""
    try:
      result = self._kv.read(key).result(timeout=timeout or remote_timeout(self.root))
    except Exception as e:
      raise StoreError(f"{self.root}/{key}: cannot read ({e or type(e).__name__}){gcs_hint(self.root)}") from e
    if result.state == "missing":
      return None
    try:
      return json.loads(bytes(result.value))
    except json.JSONDecodeError as e:
      raise StoreError(f"{self.root}/{key}: not valid JSON ({e})") from e

  def write_json(self, key: str, value: dict) -> None:
    try:
      self._kv.write(key, json.dumps(value, indent=1, sort_keys=True).encode()).result()
    except Exception as e:
      raise StoreError(f"{self.root}/{key}: cannot write ({e}){gcs_hint(self.root)}") from e

  def check_empty(self, own: Sequence[str] = ("LEASE", ".scope_jax_probe")) -> None:
    """Refuses (StoreError) a root that already holds anything but `own`: a new store is written only
    where nothing of a user's is, so none of its files can be overwritten."""
    try:
      listed = self._kv.list().result(timeout=remote_timeout(self.root))
      keys = [k.decode() for k in listed if k.decode() not in own]
    except Exception as e:
      raise StoreError(f"store root {self.root}: cannot be listed ({e}){gcs_hint(self.root)}") from e
    if keys:
      raise StoreError(
        f"store root {self.root} holds files that are not a scope_jax store ({some_names(keys)}); a new store is "
        "written only into an empty place: choose another extract.store (or --workdir), or move them away"
      )

  def probe(self) -> None:
    """Fails early, naming the root, if it cannot be written (missing bucket, no permission)."""
    key = ".scope_jax_probe"
    try:
      self._kv.write(key, b"ok").result()
      self._kv.delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()
    except Exception as e:
      raise StoreError(f"store root {self.root}: not writable or unreachable ({e}){gcs_hint(self.root)}") from e


def shard_key(shard: int) -> str:
  return f"shards/{shard:05d}"


def array_spec(root_spec: dict, key: str, width: int, dtype: str, chunk_rows: int) -> dict:
  return {
    "driver": "zarr3",
    "kvstore": _child(root_spec, key + "/"),
    # Little-endian bytes and a CRC-32C of them, one file per chunk: a damaged chunk is a read
    # error, never silently different rows. (Left to itself tensorstore picks a sharding codec
    # with one-row inner chunks, which reads 4-5x slower.)
    "metadata": {
      "shape": [0, width],
      "data_type": dtype,
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, width]}},
      "codecs": CODECS,
    },
  }


def open_array(root_spec: dict, key: str, width: int, dtype: str, chunk_rows: int, create: bool) -> ts.TensorStore:
  """Opens the array at `key`; creates it (0 rows) when it does not exist and `create`."""
  spec = array_spec(root_spec, key, width, dtype, chunk_rows)
  existing = {k: v for k, v in spec.items() if k != "metadata"}
  try:
    return ts.open(existing, open=True).result()
  except ValueError as e:
    if not create or "NOT_FOUND" not in str(e):
      raise StoreError(f"{key}: cannot open ({e})") from e
  return ts.open(spec, create=True).result()


class Store:
  """A finished store: `open_store(root)`; rows addressed per site, shards in order."""

  def __init__(self, root: str):
    self.root = root
    self.kv = KV(root)
    manifest = self.kv.read_json(MANIFEST)
    if manifest is None:
      started = self.kv.read_json(f"{shard_key(0)}/{LEDGER}") is not None
      state = "unfinished (an extraction has not completed)" if started else "not a store (no manifest.json)"
      raise StoreError(f"{root}: {state}; run or resume `scope-jax extract` first")
    self.manifest = manifest
    self.config = manifest["config"]  # the extraction's identity, as written (what `differences` compares)
    c = self.config
    self.model: str = c["model"]  # what made the rows: the model source, its text and how it was cut
    self.text: tuple[str, ...] = tuple(c["text"])
    self.seq_len: int = int(c["seq_len"])
    self.chunk_rows: int = int(c["chunk_rows"])  # rows per zarr chunk
    self.sites: tuple[str, ...] = tuple(c["sites"])
    self._widths: dict[str, int] = {site: int(w) for site, w in c["widths"].items()}
    self.shard_rows: list[int] = manifest["rows_per_shard"]
    self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
    self._arrays: dict[tuple[str, int], ts.TensorStore] = {}

  def width(self, site: str) -> int:
    return self._widths[self._check_site(site)]

  @property
  def rows(self) -> int:
    return int(self.offsets[-1])

  def stats(self, site: str) -> dict:
    """{"count", "mean" [width], "mean_sq_norm"} over every stored row of `site`."""
    s = self.manifest["stats"][self._check_site(site)]
    return {"count": s["count"], "mean": np.asarray(s["mean"], np.float64), "mean_sq_norm": s["mean_sq_norm"]}

  def _check_site(self, site: str) -> str:
    if site not in self.sites:
      raise StoreError(f"{self.root}: no site {site!r}; the store holds {list(self.sites)}")
    return site

  def array(self, site: str, shard: int) -> ts.TensorStore:
    """The tensorstore of one shard's site (or 'trace') array, opened once."""
    if (site, shard) not in self._arrays:
      key = f"{shard_key(shard)}/{site if site == 'trace' else self._check_site(site)}"
      try:
        self._arrays[site, shard] = ts.open(
          {
            "driver": "zarr3",
            "kvstore": _child(self.kv.spec, key + "/"),
            "fill_missing_data_reads": False,
          },  # a lost chunk is an error, not zeros
          open=True,
        ).result()
      except Exception as e:
        raise StoreError(f"{self.root}/{key}: cannot open ({e})") from e
    return self._arrays[site, shard]

  def chunk_files(self, site: str, shard: int) -> tuple[Path, str] | None:
    """(directory, data type) of a shard's site array on local disk when its chunks are files as this
    project writes them (`CODECS`, whole `[chunk_rows, width]` chunks, zarr3's default keys
    `c/<chunk>/0`), which the loader reads without tensorstore's decoding; None on GCS or for
    an array laid out otherwise (read through tensorstore)."""
    if self.kv.spec["driver"] != "file":
      return None
    key = f"{shard_key(shard)}/{self._check_site(site)}"
    meta = self.kv.read_json(f"{key}/zarr.json") or {}
    as_written = (
      meta.get("codecs") == CODECS
      and meta.get("data_type") in ("float32", "bfloat16")
      and meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") == [self.chunk_rows, self.width(site)]
      and meta.get("chunk_key_encoding") in DEFAULT_KEYS
    )
    return (Path(self.kv.spec["path"]) / key, meta["data_type"]) if as_written else None

  def read(self, site: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of `site` (or 'trace'), numbered across shards in order."""
    if not 0 <= start <= stop <= self.rows:
      raise IndexError(f"rows [{start}, {stop}) outside the store's {self.rows} rows")
    parts = []
    for shard in range(len(self.shard_rows)):
      lo, hi = max(start, self.offsets[shard]), min(stop, self.offsets[shard + 1])
      if lo < hi:
        base = self.offsets[shard]
        parts.append(self.array(site, shard)[lo - base : hi - base].read())
    parts = [p.result() for p in parts]
    if not parts:
      return np.zeros((0, self.width(site) if site != "trace" else len(TRACE_COLUMNS)), np.float32)
    return np.concatenate(parts)

  def trace(self, start: int, stop: int) -> dict[str, np.ndarray]:
    """{column: [stop - start]} for TRACE_COLUMNS."""
    t = self.read("trace", start, stop)
    return {name: t[:, i] for i, name in enumerate(TRACE_COLUMNS)}


def open_store(root: str) -> Store:
  return Store(root)


def merge_stats(parts: Sequence[dict]) -> dict:
  """Per-shard running sums -> {"count", "mean", "mean_sq_norm"}."""
  count = sum(p["count"] for p in parts)
  total = np.sum([np.asarray(p["sum"], np.float64) for p in parts], axis=0)
  sq = sum(p["sum_sq_norm"] for p in parts)
  return {"count": int(count), "mean": (total / max(count, 1)).tolist(), "mean_sq_norm": sq / max(count, 1)}


def write_manifest(kv: KV, identity: dict, shards: int, **extra) -> dict:
  """Merges every shard's ledger into manifest.json, which marks the store finished."""
  import importlib.metadata
  import sys
  import time

  ledgers = [kv.read_json(f"{shard_key(k)}/{LEDGER}") for k in range(shards)]
  unfinished = [p for p, lg in enumerate(ledgers) if not (lg and lg["finished"])]
  if unfinished:
    raise StoreError(f"{kv.root}: shards {unfinished} are not finished; no manifest written")
  manifest = {
    "config": identity,
    "rows_per_shard": [lg["rows"] for lg in ledgers],
    "rows": sum(lg["rows"] for lg in ledgers),
    "stats": {s: merge_stats([lg["stats"][s] for lg in ledgers]) for s in identity["sites"]},
    "trace_columns": list(TRACE_COLUMNS),
    "scope_jax": importlib.metadata.version("scope_jax"),
    "python": sys.version.split()[0],
    "created": time.time(),
    **extra,
  }
  kv.write_json(MANIFEST, manifest)
  return manifest
