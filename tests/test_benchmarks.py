"""The benchmarks that must not rot run at small shapes: each ends with one JSON line whose
figures are present, finite and positive (their values are recorded in benchmarks/README.md)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(module: str, tmp_path) -> dict:
  env = dict(os.environ, PYTHONPATH=str(REPO), BENCH_DIR=str(tmp_path), XLA_FLAGS="")
  out = subprocess.run(
    [sys.executable, "-m", module, "--small"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def positive(x) -> bool:
  return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_the_device_benchmark_measures_every_part_at_small_shapes(tmp_path):
  r = run_benchmark("benchmarks.device", tmp_path)
  assert r["platform"] == "cpu"
  assert {(s["step"], s["precision"]) for s in r["steps"]} == {
    (step, p) for step in ("dense", "sparse") for p in ("float32", "bfloat16")
  }
  for s in r["steps"]:
    assert all(positive(s[k]) for k in ("step_s", "mfu", "mfu_over_gemma_scope", "peak_flops", "loader_feed_ratio"))
    assert s["mfu"] < 2  # 12·B·d·M over a peak measured on the step's own matmul shape
    assert (s["capacity"] > 0) == (s["step"] == "sparse")
  assert all(positive(r["extraction"][k]) for k in ("forward_tokens_per_s", "writer_tokens_per_s"))
  assert r["extraction"]["site"] == "res.3"  # the 4-layer model's last layer
  assert positive(r["eval"]["engine_over_bound"])


def test_the_loader_benchmark_measures_one_and_two_workers_beside_the_presets_feeds(tmp_path):
  r = run_benchmark("benchmarks.loader", tmp_path)
  assert set(r["loader"]) == {"1", "2"} and set(r["writer"]) == {
    f"{w} {dtype}" for w in (1, 2) for dtype in ("float32", "bfloat16")
  }
  assert all(positive(x["rows_per_s"]) for x in [*r["loader"].values(), *r["writer"].values()])
  assert set(r["feeds_h100x8"]) == {f"{size} {p}" for size in ("2b", "9b", "27b") for p in ("float32", "bfloat16")}
  feeds = r["feeds_h100x8"]
  for size in ("2b", "9b", "27b"):  # the bfloat16 peak is 989 / 67 of the float32 one on an H100
    ratio = feeds[f"{size} bfloat16"]["rows_per_s"] / feeds[f"{size} float32"]["rows_per_s"]
    assert ratio == pytest.approx(989 / 67)


def test_the_clt_step_benchmark_measures_dense_sparse_and_the_roofline(tmp_path):
  r = run_benchmark("benchmarks.clt_step", tmp_path)
  (row,) = r["rows"]
  assert all(positive(row[k]) for k in ("dense_tok_s", "sparse_tok_s", "roofline_tok_s", "matmul_gflops"))
  assert row["sparse_layers_fraction"] > 0  # the sparse path ran, not only its dense fallback


def test_the_finetune_step_benchmark_measures_the_step_beside_its_bound(tmp_path):
  r = run_benchmark("benchmarks.finetune_step", tmp_path)
  keys = ("shared_tok_s", "sae_step_tok_s", "bound_tok_s", "step_vs_bound", "gflop_per_token", "matmul_gflops")
  assert all(positive(r[k]) for k in keys)
  assert 0.5 < r["unembedding_share_of_flops"] < 1  # two layers after res.15: the 262K-row unembedding dominates
