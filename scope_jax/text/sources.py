"""Text sources: documents streamed from local or `gs://` files, Hugging Face datasets, or the
corpus every Python installation carries.

A source spec is a list of entries (a single string is a one-entry list):

    "corpus/*.jsonl"                    local glob; .txt, .jsonl, .parquet (optionally .gz for txt/jsonl)
    "gs://bucket/web/part-*.parquet"    same on GCS (gcsfs)
    "hf:allenai/c4:en:train"            Hugging Face `datasets`, streamed (only if installed)
    "builtin:python-docs"               the Python documentation shipped with CPython (`pydoc_data`)
    "builtin:python-stdlib"             the source of CPython's standard library (code and docstrings)
    "builtin:python-docstrings"         the standard library's docstrings alone (technical English)

Documents are numbered in order across entries (files sorted within a glob), so a document id
names the same text on every host and every run. `.txt` files yield one document per paragraph
(blank-line separated); `.jsonl` and `.parquet` one per record, text in `text_field`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence

BUILTIN_CORPORA = {
  "python-docs": "The Python documentation topics shipped with CPython in `pydoc_data.topics` "
  "(© Python Software Foundation, PSF License Version 2), one document per topic.",
  "python-stdlib": "The standard library's own `.py` files (© Python Software Foundation, PSF License "
  "Version 2), one document per file in path order; test suites and site-packages left out. "
  "Its size and content follow the Python version (3.11: 734 files, ~12 MB, ~3.5M tokens).",
  "python-docstrings": "The docstrings of the standard library's `.py` files (© Python Software Foundation, PSF "
  "License Version 2): one document per module, its module, class and function docstrings "
  "in source order (3.11: ~1.8 MB, ~0.45M tokens). Prose like the documentation's.",
}
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")


def _gcs():
  """A gcsfs filesystem; against an emulator (STORAGE_EMULATOR_HOST) anonymously."""
  import gcsfs

  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  return gcsfs.GCSFileSystem(endpoint_url=emulator, token="anon") if emulator else gcsfs.GCSFileSystem()


def expand(entry: str) -> list[str]:
  """A path or glob (local or gs://) -> sorted file list; a clear error when nothing matches."""
  if entry.startswith("gs://"):
    try:
      files = sorted("gs://" + p for p in _gcs().glob(entry))
    except Exception as e:  # gcsfs raises many kinds for missing buckets / unreachable hosts
      raise FileNotFoundError(f"text source {entry}: cannot list it ({type(e).__name__}: {e})") from e
  else:
    files = sorted(glob.glob(os.path.expanduser(entry))) if glob.has_magic(entry) else [entry]
    files = [f for f in files if os.path.isfile(f)]
  if not files:
    raise FileNotFoundError(f"text source {entry}: no such file")
  for f in files:
    if not f.endswith(SUFFIXES):
      raise ValueError(f"text source {f}: unsupported file type; expected one of {SUFFIXES}")
  return files


def _open(path: str, mode: str = "rb"):
  if path.startswith("gs://"):
    return _gcs().open(path, mode)
  return open(path, mode)


def _text_lines(path: str) -> Iterator[str]:
  with _open(path) as raw:
    stream = gzip.open(raw) if path.endswith(".gz") else raw
    try:
      yield from io.TextIOWrapper(stream, encoding="utf-8")
    except UnicodeDecodeError as e:  # its position is within a decoded block, not the file
      raise ValueError(f"text source {path}: not UTF-8 ({e.reason}: {e.object[e.start : e.end]!r}); convert it") from e


def _paragraphs(path: str) -> Iterator[str]:
  paragraph: list[str] = []
  for line in _text_lines(path):
    if line.strip():
      paragraph.append(line)
    elif paragraph:
      yield "".join(paragraph).strip()
      paragraph = []
  if paragraph:
    yield "".join(paragraph).strip()


def _records(path: str, text_field: str) -> Iterator[str]:
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq
    except ImportError as e:
      raise ImportError(f"text source {path}: reading .parquet needs pyarrow (pip install pyarrow)") from e
    with _open(path) as f:
      table = pq.ParquetFile(f)
      if text_field not in table.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); set text_field")
      for batch in table.iter_batches(columns=[text_field]):
        yield from (t or "" for t in batch.column(0).to_pylist())
    return
  for n, line in enumerate(_text_lines(path), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    if not isinstance(record, dict) or text_field not in record:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise ValueError(f"{path}:{n}: record has no field {text_field!r} (fields: {keys}); set text_field")
    yield record[text_field]


def _stdlib_files() -> list[str]:
  import sysconfig

  root = sysconfig.get_paths()["stdlib"]
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP and d != "__pycache__")
    found += [os.path.join(folder, f) for f in files if f.endswith(".py")]
  return sorted(found, key=lambda p: os.path.relpath(p, root))


def _docstrings(source: bytes) -> str:
  """A module's docstrings (module, classes, functions) in source order, blank-line separated."""
  import ast

  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):  # a few stdlib files are templates or target other versions
    return ""
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  nodes = sorted((n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0))
  return "\n\n".join(d for d in (ast.get_docstring(n, clean=True) for n in nodes) if d)


def _builtin(name: str) -> Iterator[str]:
  if name not in BUILTIN_CORPORA:
    raise ValueError(f"text source builtin:{name}: unknown; available: {sorted(BUILTIN_CORPORA)}")
  if name in ("python-stdlib", "python-docstrings"):
    for path in _stdlib_files():
      with open(path, "rb") as f:
        source = f.read()
      yield _docstrings(source) if name == "python-docstrings" else source.decode("utf-8", errors="replace")
    return
  from pydoc_data.topics import topics

  for key in sorted(topics):
    yield topics[key]


def _huggingface(spec: str, text_field: str) -> Iterator[str]:
  try:
    import datasets
  except ImportError as e:
    raise ImportError(f"text source hf:{spec} needs the `datasets` package (pip install datasets)") from e
  name, config, split = (spec.split(":") + [None, None])[:3]
  for record in datasets.load_dataset(name, config, split=split or "train", streaming=True):
    yield record[text_field]


def iter_texts(entry: str, text_field: str = "text") -> Iterator[str]:
  if entry.startswith("builtin:"):
    yield from _builtin(entry.removeprefix("builtin:"))
  elif entry.startswith("hf:"):
    yield from _huggingface(entry.removeprefix("hf:"), text_field)
  else:
    for path in expand(entry):
      yield from _paragraphs(path) if path.endswith((".txt", ".txt.gz")) else _records(path, text_field)


def iter_documents(spec: str | Sequence[str], text_field: str = "text") -> Iterator[tuple[int, str]]:
  """(document id, text) for every non-empty document of the spec, in a fixed order."""
  for doc_id, _, text in iter_entry_documents(spec, text_field):
    yield doc_id, text


def iter_entry_documents(spec: str | Sequence[str], text_field: str = "text") -> Iterator[tuple[int, str, str]]:
  """(document id, the spec entry it comes from, text): `iter_documents` with each one's source."""
  entries = [spec] if isinstance(spec, str) else list(spec)
  if not entries:
    raise ValueError("text source list is empty")
  for entry in entries:  # fail fast on a bad entry before streaming the first one
    if not entry.startswith(("builtin:", "hf:")):
      expand(entry)
  doc_id = 0
  for entry in entries:
    for text in iter_texts(entry, text_field):
      if text and text.strip():
        yield doc_id, entry, text
        doc_id += 1
