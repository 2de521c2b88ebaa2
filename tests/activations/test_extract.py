"""Extraction into the store: traceable rows equal to the model's, local and gs://, kill -9
resume, two real processes, and bad input that leaves what was written intact."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import scope_jax as sj
from scope_jax.activations.extract import extract
from scope_jax.activations.store import StoreError, open_store
from scope_jax.activations.writer import NonFiniteActivations
from scope_jax.config import default_config
from scope_jax.text.sources import iter_documents
from tests.helpers import run_processes, tree_hashes

REPO = Path(__file__).resolve().parents[2]
SITES = ["res.1", "att.2", "mlp_in.0"]


def make_config(model_dir, tokens=8_000, **extract_fields):
  c = default_config()
  c.model = str(model_dir)
  c.sites = SITES
  c.extract.seq_len, c.extract.batch_size, c.extract.tokens = 64, 8, tokens
  c.extract.bucket_rows, c.extract.chunk_rows = 1_024, 128
  for k, v in extract_fields.items():
    setattr(c.extract, k, v)
  return c


@pytest.fixture(scope="module")
def lm(tiny_model):
  return sj.load_model(tiny_model)


@pytest.fixture(scope="module")
def local_store(lm, tiny_model, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("extract")
  summary = extract(make_config(tiny_model), workdir, lm=lm, progress=False)
  return open_store(summary["root"]), summary


def packed_stream(tokenizer, n_sequences, seq_len):
  """The pack-mode sequences rebuilt independently: documents' ids, each followed by EOS."""
  tokens, docs, positions = [], [], []
  for doc_id, text in iter_documents("builtin:python-docs"):
    ids = tokenizer.sp.EncodeAsIds(text)
    tokens += ids + [tokenizer.eos_id]
    docs += [doc_id] * len(ids) + [-1]
    positions += list(range(len(ids))) + [-1]
    if len(tokens) > n_sequences * (seq_len - 1):
      break
  body = seq_len - 1
  seqs = np.array([[tokenizer.bos_id] + tokens[s * body : (s + 1) * body] for s in range(n_sequences)], np.int32)
  doc = np.array([[-1] + docs[s * body : (s + 1) * body] for s in range(n_sequences)])
  pos = np.array([[-1] + positions[s * body : (s + 1) * body] for s in range(n_sequences)])
  return seqs, doc, pos


def test_stored_rows_are_the_models_activations_at_their_trace(lm, local_store):
  store, _ = local_store
  n_seq = math.ceil(8_000 / (8 * 63)) * 8
  seqs, doc, pos = packed_stream(lm.tokenizer, n_seq, 64)
  assert store.rows == int((doc >= 0).sum())  # rows stored = non-special tokens processed
  trace = store.trace(0, store.rows)
  np.testing.assert_array_equal(trace["token"], seqs[trace["seq"], trace["col"]])
  np.testing.assert_array_equal(trace["doc"], doc[trace["seq"], trace["col"]])
  np.testing.assert_array_equal(trace["pos"], pos[trace["seq"], trace["col"]])
  assert len(set(zip(trace["seq"], trace["col"]))) == store.rows  # each token once
  assert not np.all(np.diff(trace["seq"]) >= 0)  # buckets are shuffled
  acts = lm.activations(seqs, SITES)
  for site in SITES:
    rows = store.read(site, 0, store.rows)
    assert rows.shape == (store.rows, store.width(site))
    expected = np.asarray(acts[site])[trace["seq"], trace["col"]]
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-5, err_msg=site)
    stats = store.stats(site)
    assert stats["count"] == store.rows
    np.testing.assert_allclose(stats["mean"], expected.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["mean_sq_norm"], np.mean(np.sum(expected.astype(np.float64) ** 2, 1)), rtol=1e-5)


def test_truncate_mode_and_bfloat16(lm, tiny_model, tmp_path):
  c = make_config(tiny_model, tokens=2_000, mode="truncate", dtype="bfloat16")
  store = open_store(extract(c, tmp_path, lm=lm, progress=False)["root"])
  trace = store.trace(0, store.rows)
  docs = dict(iter_documents("builtin:python-docs"))
  for d, p, token in list(zip(trace["doc"], trace["pos"], trace["token"]))[:200]:
    assert p < 63 and lm.tokenizer.sp.EncodeAsIds(docs[d])[p] == token
  assert store.read("res.1", 0, 10).dtype.name == "bfloat16"


def test_a_finished_store_is_left_alone_and_another_config_is_refused(lm, tiny_model, local_store):
  store, summary = local_store
  again = extract(make_config(tiny_model), Path(summary["root"]).parent, lm=lm, progress=False)
  assert again["already_finished"] and again["rows"] == store.rows
  changed = make_config(tiny_model, chunk_rows=256)
  changed.data.holdout_every = 4
  with pytest.raises(
    StoreError, match=r"another config; differing fields:\n  chunk_rows: 128 -> 256\n  holdout_every: 0 -> 4\nuse"
  ):
    extract(changed, Path(summary["root"]).parent, lm=lm, progress=False)
  assert open_store(summary["root"]).rows == store.rows


def test_gcs_store_and_gcs_text_equal_the_local_store(gcs, lm, tiny_model, local_store, tmp_path):
  store, _ = local_store
  gcs.mkdir("corpus")
  gcs.mkdir("acts")
  docs = list(iter_documents("builtin:python-docs"))
  for part in range(2):
    with gcs.open(f"corpus/docs/part-{part}.jsonl", "w") as f:
      for _, text in docs[part * 40 : (part + 1) * 40]:
        f.write(json.dumps({"body": text}) + "\n")
  c = make_config(tiny_model)
  c.data.text, c.data.text_field = ["gs://corpus/docs/part-*.jsonl"], "body"
  c.extract.store = "gs://acts/run1"
  extract(c, tmp_path, lm=lm, progress=False)
  remote = open_store("gs://acts/run1")
  assert remote.rows == store.rows
  for site in ["trace", *SITES]:
    np.testing.assert_array_equal(remote.read(site, 0, remote.rows), store.read(site, 0, store.rows))
  assert gcs.exists("acts/run1/manifest.json")


def _extract_cmd(model, workdir, *extra):
  return [
    sys.executable,
    "-m",
    "scope_jax.cli",
    "extract",
    "--config",
    f"{REPO}/configs/local.py",
    "--workdir",
    str(workdir),
    f"--config.model={model}",
    "--config.sites=('res.1','mlp.2')",
    "--config.extract.seq_len=64",
    "--config.extract.bucket_rows=512",
    "--config.extract.chunk_rows=64",
    "--config.data.holdout_every=0",
    "--config.extract.tokens=300000",  # ~6 s of the tiny model: ~150x the rows the interruptions wait for
    *extra,
  ]


def _shard_content(root):
  store = open_store(str(root))
  return {k: store.read(k, 0, store.rows) for k in ("trace", "res.1", "mlp.2")}, store.manifest


@pytest.fixture(scope="module")
def straight_store(tiny_model, tmp_path_factory):
  """The CLI's extraction run straight through: what every interrupted one must end up equal to."""
  straight = tmp_path_factory.mktemp("straight")
  subprocess.run(_extract_cmd(tiny_model, straight), cwd=REPO, check=True, capture_output=True)
  return _shard_content(straight / "activations")


@pytest.mark.parametrize(
  "sig, code", [(signal.SIGKILL, -9), (signal.SIGTERM, -15), (signal.SIGINT, 130)], ids=["kill -9", "SIGTERM", "Ctrl-C"]
)
def test_kill_9_sigterm_or_ctrl_c_then_resume_gives_the_uninterrupted_store(
  tiny_model, tmp_path, straight_store, sig, code
):
  killed = tmp_path / "killed"
  proc = subprocess.Popen(
    _extract_cmd(tiny_model, killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  ledger = killed / "activations" / "shards" / "00000" / "ledger.json"
  deadline = time.time() + 120
  while not (ledger.exists() and json.loads(ledger.read_text())["rows"] > 2_000):
    assert proc.poll() is None and time.time() < deadline, "extraction ended before it could be killed"
    time.sleep(0.01)
  proc.send_signal(sig)  # once: a Ctrl-C is recorded, never dropped in JAX's gc callback (parallel/interrupt.py)
  assert proc.wait() == code
  assert not (killed / "activations" / "manifest.json").exists()
  assert (killed / "LEASE").exists() or sig != signal.SIGKILL  # left behind by kill -9; must not block
  done = subprocess.run(_extract_cmd(tiny_model, killed), cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0 and "resumed at batch" in done.stdout, done.stderr
  (a, manifest_a), (b, manifest_b) = straight_store, _shard_content(killed / "activations")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert manifest_a["stats"] == manifest_b["stats"]
  again = subprocess.run(_extract_cmd(tiny_model, killed), cwd=REPO, capture_output=True, text=True)
  assert again.returncode == 0 and "already finished" in again.stdout


def test_two_processes_write_disjoint_shards_whose_union_is_the_single_process_store(tiny_model, tmp_path):
  """One process writing 2 shards (`extract.shards=2`) and two processes writing one each give
  the same store, shard for shard and row for row."""
  single, double = tmp_path / "single", tmp_path / "double"
  tokens = "--config.extract.tokens=6000"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  subprocess.run(
    _extract_cmd(tiny_model, single, tokens, "--config.extract.shards=2"),
    cwd=REPO,
    check=True,
    capture_output=True,
    env=env,
  )
  run_processes(_extract_cmd(tiny_model, double, tokens), cwd=REPO)
  one, manifest_one = _shard_content(single / "activations")
  two, manifest_two = _shard_content(double / "activations")
  assert manifest_one["rows_per_shard"] == manifest_two["rows_per_shard"]
  assert len(manifest_two["rows_per_shard"]) == 2 and min(manifest_two["rows_per_shard"]) > 0
  np.testing.assert_array_equal(one["trace"], two["trace"])
  for site in ("res.1", "mlp.2"):
    np.testing.assert_allclose(one[site], two[site], rtol=1e-5, atol=1e-6)
    s1, s2 = manifest_one["stats"][site], manifest_two["stats"][site]
    assert s1["count"] == s2["count"]
    np.testing.assert_allclose(s1["mean"], s2["mean"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s1["mean_sq_norm"], s2["mean_sq_norm"], rtol=1e-6)
  store = open_store(str(double / "activations"))
  for shard, (lo, hi) in enumerate(zip(store.offsets[:-1], store.offsets[1:])):
    seq = store.read("trace", lo, hi)[:, 3]
    assert np.all(seq % 8 // 4 == shard)  # each process stored only the sequences its devices ran


# --------------------------------------------------------------------------- bad input


def test_missing_bucket_is_a_clear_error_and_writes_nothing(gcs, lm, tiny_model, tmp_path):
  c = make_config(tiny_model)
  c.extract.store = "gs://no-such-bucket/acts"
  with pytest.raises(ValueError, match=r"store gs://no-such-bucket/acts cannot be reached \(NOT_FOUND.*\n  bucket 'no"):
    extract(c, tmp_path, lm=lm, progress=False)


def test_empty_corpus_is_refused_before_anything_is_written(lm, tiny_model, tmp_path):
  (tmp_path / "empty.txt").write_text("\n\n   \n")
  c = make_config(tiny_model)
  c.data.text = [str(tmp_path / "empty.txt")]
  with pytest.raises(ValueError, match=r"no documents in data.text \[.*empty.txt'\]"):
    extract(c, tmp_path / "w", lm=lm, progress=False)
  assert not (tmp_path / "w" / "activations" / "config.json").exists()


def test_missing_text_field_names_the_file_and_line(lm, tiny_model, tmp_path):
  (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"content": "no text here"}\n')
  c = make_config(tiny_model)
  c.data.text = [str(tmp_path / "docs.jsonl")]
  with pytest.raises(ValueError, match=r"docs.jsonl:2: record has no field 'text' \(fields: \['content'\]\)"):
    extract(c, tmp_path / "w", lm=lm, progress=False)


def test_non_finite_activations_name_site_document_and_position(tiny_model, lm, tmp_path):
  import shutil

  from safetensors.numpy import load_file, save_file

  seqs, doc, pos = packed_stream(lm.tokenizer, 200, 64)
  first_seq = {}
  for s, row in enumerate(seqs):
    for t in row:
      first_seq.setdefault(int(t), s)
  bad_token = next(t for t, s in sorted(first_seq.items(), key=lambda kv: kv[1]) if s >= 40)
  poisoned = tmp_path / "poisoned"
  shutil.copytree(tiny_model, poisoned)
  weights = load_file(poisoned / "model.safetensors")
  weights["model.embed_tokens.weight"][bad_token] = np.inf  # NaN through the whole sequence that has it
  save_file(weights, poisoned / "model.safetensors")
  c = make_config(poisoned, tokens=0)
  with pytest.raises(NonFiniteActivations, match=r"rows of site res.1 hold NaN or Inf; the first: document") as e:
    extract(c, tmp_path / "w", lm=sj.load_model(poisoned), progress=False)
  d, p, s, col = map(
    int, re.search(r"document (\d+), position (\d+) \(sequence (\d+), column (\d+)", str(e.value)).groups()
  )
  assert s == first_seq[bad_token] and bad_token in seqs[s]
  assert (doc[s, col], pos[s, col]) == (d, p)
  ledger = json.loads((tmp_path / "w" / "activations" / "shards" / "00000" / "ledger.json").read_text())
  assert ledger["rows"] > 0 and not ledger["finished"]  # earlier buckets stay committed
  assert f"the store keeps {ledger['rows']} committed rows" in str(e.value)


def test_a_damaged_committed_chunk_stops_the_resume_naming_shard_site_and_chunk(tiny_model, tmp_path):
  """A crash after the last flush but before manifest.json (every shard finished): the resume
  re-reads what was committed, finds the flipped bit by its CRC-32C, and seals nothing."""
  subprocess.run(_extract_cmd(tiny_model, tmp_path), cwd=REPO, check=True, capture_output=True)
  store = tmp_path / "activations"
  (store / "manifest.json").unlink()
  chunk = store / "shards" / "00000" / "mlp.2" / "c" / "3" / "0"
  data = bytearray(chunk.read_bytes())
  data[100] ^= 0x04
  chunk.write_bytes(bytes(data))
  before = tree_hashes(store)
  done = subprocess.run(_extract_cmd(tiny_model, tmp_path), cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
  assert f"scope-jax extract: {store}: shard 0 site mlp.2 chunk 3 (rows 192..) is damaged" in done.stderr
  assert tree_hashes(store) == before and not (store / "manifest.json").exists()


def test_disk_full_during_extraction_is_one_clear_error_and_resumes(tiny_model, tmp_path, small_disk):
  disk, resize = small_disk
  budget = "--config.extract.tokens=100000"
  subprocess.run(_extract_cmd(tiny_model, tmp_path / "straight", budget), cwd=REPO, check=True, capture_output=True)
  cmd = _extract_cmd(tiny_model, disk / "w", budget)
  full = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
  last = full.stderr.strip().splitlines()[-2:]
  assert last[0].startswith(f"scope-jax extract: {disk / 'w' / 'activations'}/shards/00000: writing rows")
  assert "No space left on device" in last[0] and last[1].startswith("the disk is full: free space and run")
  assert not (disk / "w" / "activations" / "manifest.json").exists()
  resize("512m")
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
  a, manifest_a = _shard_content(tmp_path / "straight" / "activations")
  b, manifest_b = _shard_content(disk / "w" / "activations")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert manifest_a["stats"] == manifest_b["stats"]


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _extract_to_gcs(tiny_model, tmp_path, endpoint, *extra):
  env = dict(os.environ, TENSORSTORE_GCS_HTTP_URL=endpoint)
  env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  cmd = _extract_cmd(tiny_model, tmp_path / "w", "--config.extract.store=gs://scope-jax-lost/acts", *extra)
  started = time.time()
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  return done, time.time() - started


def test_an_unreachable_bucket_fails_after_bounded_retries_naming_bucket_endpoint_and_credentials(tiny_model, tmp_path):
  endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
  done, seconds = _extract_to_gcs(tiny_model, tmp_path, endpoint, "--config.storage.retries=2")
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert (
    "scope-jax extract: store gs://scope-jax-lost/acts cannot be reached (ABORTED: All 2 retry attempts" in done.stderr
  )
  assert f"bucket 'scope-jax-lost' at endpoint {endpoint}" in done.stderr
  assert "credentials looked for: GOOGLE_APPLICATION_CREDENTIALS (unset)" in done.stderr
  assert seconds < 120, seconds  # 2 retries of 1 s and 2 s, far below the default minute


def test_a_bucket_that_never_answers_fails_at_the_storage_timeout(tiny_model, tmp_path):
  import socket
  import threading

  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(16)
  held = []  # connections accepted and never answered
  threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(16)], daemon=True).start()
  endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
  try:
    done, seconds = _extract_to_gcs(tiny_model, tmp_path, endpoint, "--config.storage.timeout_s=3")
  finally:
    server.close()
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert "store gs://scope-jax-lost/acts cannot be reached (TimeoutError" in done.stderr, done.stderr[-3000:]
  assert "first answer within 3 s (config.storage)" in done.stderr
  assert seconds < 120, seconds
