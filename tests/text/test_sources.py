"""Text sources: every file kind, globs in order, the bundled corpus, and clear errors."""

import gzip
import json

import pytest

from scope_jax.text.sources import iter_documents


def test_every_file_kind_in_a_fixed_order(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n\n\n")
  with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
    f.write(json.dumps({"body": "from jsonl.gz"}) + "\n\n" + json.dumps({"body": ""}) + "\n")
  pq.write_table(pa.table({"body": ["from parquet", None, "again"]}), tmp_path / "c.parquet")
  docs = list(
    iter_documents(
      [str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl.gz"), str(tmp_path / "c.parquet")], text_field="body"
    )
  )
  assert docs == [
    (0, "first paragraph\nstill first"),
    (1, "second paragraph"),
    (2, "from jsonl.gz"),
    (3, "from parquet"),
    (4, "again"),
  ]


def test_the_bundled_corpus_is_there_and_stable():
  docs = list(iter_documents("builtin:python-docs"))
  assert len(docs) > 50 and sum(len(t) for _, t in docs) > 300_000
  assert [d for d, _ in docs] == list(range(len(docs)))


def test_the_standard_library_corpus_is_its_source_files_in_path_order():
  import sysconfig
  import textwrap

  docs = list(iter_documents("builtin:python-stdlib"))
  assert len(docs) > 300 and sum(len(t) for _, t in docs) > 5_000_000
  texts = [t for _, t in docs]
  with open(f"{sysconfig.get_paths()['stdlib']}/textwrap.py", encoding="utf-8") as f:
    assert f.read() in texts
  assert textwrap.__doc__.strip().splitlines()[0] in "".join(texts)
  assert not any("import unittest\nfrom test import support" in t for t in texts)  # test suites left out
  assert list(iter_documents("builtin:python-stdlib"))[:3] == docs[:3]


def test_the_docstrings_corpus_is_the_standard_librarys_docstrings_in_source_order():
  import textwrap

  docs = [t for _, t in iter_documents("builtin:python-docstrings")]
  assert len(docs) > 300 and sum(len(t) for t in docs) > 1_000_000
  module = next(t for t in docs if t.startswith(textwrap.__doc__.strip()))
  wrap = module.index(textwrap.wrap.__doc__.strip().splitlines()[0])
  assert module.index(textwrap.TextWrapper.__doc__.strip().splitlines()[0]) < wrap  # class before the later function
  assert "def wrap(" not in module and "import re" not in module  # docstrings only, no code


def test_bad_sources_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="text source .*nope.txt: no such file"):
    list(iter_documents(str(tmp_path / "nope.txt")))
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match=r"x.csv: unsupported file type"):
    list(iter_documents(str(tmp_path / "x.csv")))
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
    list(iter_documents(str(tmp_path / "bad.jsonl")))
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
  with pytest.raises(ValueError, match=r"p.parquet: no column 'text' \(columns: \['content'\]\)"):
    list(iter_documents(str(tmp_path / "p.parquet")))
  with pytest.raises(ValueError, match="builtin:nope: unknown"):
    list(iter_documents("builtin:nope"))


def test_text_that_is_not_utf8_names_the_file_and_the_bytes(tmp_path):
  (tmp_path / "latin1.txt").write_bytes("first paragraph\n\ncaf\xe9 au lait\n".encode("latin-1"))
  expected = r"text source .*latin1.txt: not UTF-8 \(invalid continuation byte: b'\\xe9'\); convert it"
  with pytest.raises(ValueError, match=expected):
    list(iter_documents(str(tmp_path / "latin1.txt")))
