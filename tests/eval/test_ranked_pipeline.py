"""The main job with TopK and BatchTopK SAEs (`configs/local.py:kind=topk|batchtopk`) on a tiny
model: extraction, training, export, evaluation, the report, the browser and matching run on them
as on JumpReLU SAEs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_the_main_job_runs_every_stage_on_rank_chosen_saes(tiny_model, tmp_path, kind):
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "scope_jax.cli",
      "run",
      "--config",
      f"{REPO}/configs/local.py:kind={kind},tokens=8000,steps=40,widths=128+256,k=4+8,site=res.1",
      "--workdir",
      str(tmp_path / "run"),
      f"--config.model={tiny_model}",
      "--config.train.batch_size=256",
      "--config.train.log_every=20",
      "--config.export.batches=4",
      "--config.eval.sequences=8",
      "--config.eval.seq_len=64",
      "--config.eval.batch_size=8",
      "--config.eval.domain_sequences=8",
      "--config.eval.quantize_sequences=8",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  workdir = tmp_path / "run"
  index = json.loads((workdir / "export" / "index.json").read_text())
  assert sorted(e["name"] for e in index) == ["w128-k4-s0", "w128-k8-s0", "w256-k4-s0", "w256-k8-s0"]
  assert all(e["activation"] == kind and e["k"] in (4, 8) and e["l1_coefficient"] is None for e in index)
  metrics = json.loads((workdir / "report" / "metrics.json").read_text())["float32"]
  for name, r in metrics.items():
    assert r["k"] in (4, 8) and r["delta_loss"] == r["delta_loss"], name  # evaluated (not NaN)
    if kind == "topk":
      assert r["l0"] == pytest.approx(r["k"]), name  # every eval token keeps k latents
  report = (workdir / "report" / "report.md").read_text()
  assert "| SAE | width | λ | k | L0 |" in report and "| w128-k4-s0 | 128 | — | 4 |" in report
  assert "browse: 768 latents of 4 SAEs" in run.stdout
  assert len(list((workdir / "browse" / "w256-k8-s0" / "data").glob("*.js"))) == 256
  lens = sorted(e["saelens"] for e in index if e["k"] == 8)
  store = str(workdir / "activations")
  matched = subprocess.run(
    [sys.executable, "-m", "scope_jax.cli", "match", *lens, "--out", str(tmp_path / "match"), "--store", store],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert matched.returncode == 0, matched.stderr[-2000:]
  pairs = json.loads((tmp_path / "match" / "matches.json").read_text())
  assert len(pairs) == 1 and pairs[0]
