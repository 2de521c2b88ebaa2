"""The plan of a job on a slice it does not run on: bytes from its compiled step, FLOPs, bad targets."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from scope_jax import grid
from scope_jax.config import default_config
from scope_jax.data.batch import Batch
from scope_jax.parallel.devices import target
from scope_jax.parallel.mesh import make_mesh
from scope_jax.train import run, stacked
from scope_jax.train.memory import need_per_device
from scope_jax.train.plan import PlanError, train_cost, train_flops
from scope_jax.train.tiling import DENSE_TEMPORARIES

D = 2_304  # gemma2-2b's d_model
REPO = Path(__file__).resolve().parents[2]


def _config(widths=(1_024, 2_048), batch=512, model_axis=0):
  c = default_config()
  c.model, c.site = "/ckpt/gemma-2-2b", "res.12"  # a preset, named as a checkpoint folder would be
  c.sweep.widths, c.sweep.l1_coefficients = widths, (1e-3, 1e-2)
  c.train.batch_size, c.train.steps, c.mesh.model = batch, 1_000, model_axis
  return c


def test_the_plans_bytes_and_flops_follow_the_hand_formulas():
  config = _config()
  cost = train_cost(config, target("h100x8"))
  assert cost.mesh == {"data": 8, "model": 1} and cost.fits and cost.tiling == "2 blocks, pre kept"
  # 10·B·d·M per SAE with kept pre-activations (12 without)
  assert cost.flops_per_step == 10 * 512 * D * 2 * (1_024 + 2_048)
  assert train_flops(config, D, D, keep_pre=False) == 12 * 512 * D * 2 * (1_024 + 2_048)
  assert cost.step_s_at_peak == pytest.approx(cost.flops_per_step / (8 * 67e12))
  assert cost.device_hours(8) == pytest.approx(1_000 * cost.step_s_at_peak / 0.508 * 8 / 3600)
  # bytes: the state (parameters, Adam's one moment at β1 = 0, two int32 counters per latent) and
  # the batch are all there; what is more is within one more copy of the parameters (the CPU
  # compiler's schedule copies the stacks once per step: measured 113 MB of 340 MB here) and the
  # tiling's stated temporaries (8 floats per row and latent of a block, the kept pre-activations)
  groups = list(stacked.groups_from(config))
  need = need_per_device(groups, D, D, 512, make_mesh(8, 1), False)
  state = 2 * need.params + 2 * 4 * 2 * 3_072
  batch_bytes = 4 * 64 * D
  assert state + batch_bytes <= cost.bytes_per_device
  temporaries = sum(4 * 64 * (DENSE_TEMPORARIES + 1) * w for w in (1_024, 2_048))
  assert cost.bytes_per_device <= state + need.params + batch_bytes + temporaries


def test_xlas_own_count_of_one_sae_in_one_block_agrees_with_the_formula():
  """XLA counts a loop body once, so only a step whose loops each run once can be checked this way."""
  config = _config(widths=(1_024,))
  config.sweep.l1_coefficients = (1e-3,)
  sweep, mesh = stacked.sweep_from(config), make_mesh(1, 1)
  built = run.build(sweep, mesh, np.zeros(D), free_bytes=80 * 10**9)
  state = stacked.abstract_state(built.init, built.shardings)
  rows = Batch(jax.ShapeDtypeStruct((512, D), np.float32))
  flops = built.make_step(()).lower(state, rows).compile().cost_analysis()["flops"]
  assert flops == pytest.approx(train_flops(config, D, D, keep_pre=True), rel=0.05)


def test_bad_targets_and_jobs_that_cannot_fit_are_named():
  with pytest.raises(ValueError, match=r"unknown target 'h100x3': expected KIND-N .* \(v4-32"):
    target("h100x3")
  with pytest.raises(PlanError, match=r"mesh.model 3 does not divide the 8 chips of h100x8"):
    train_cost(_config(widths=(3_072,), model_axis=3), target("h100x8"))
  jobs = [
    grid.Job("train", "train/res.12-fits", "w1", _config(), ("res.12",), (1_024, 2_048)),
    grid.Job("train", "train/res.12-huge", "w2", _config(widths=(16_777_216,)), ("res.12",), (16_777_216,)),
    grid.Job("train", "train/res.12-odd", "w3", _config(widths=(3_072,), model_axis=3), ("res.12",), (3_072,)),
  ]
  rows = grid.cost_table(jobs, "h100x8", progress=False).splitlines()
  assert rows[1].split()[:4] == ["train/res.12-fits", "8×1", rows[1].split()[2], "yes"]
  assert rows[2].split()[3] == "NO"  # 16M latents × 2 λ at d 2,304, over 8 chips: 155 GB of state each
  assert "cannot be planned: mesh.model 3 does not divide" in rows[3]
  assert "1 jobs do not fit; 1 jobs cannot be planned" in rows[4]


def test_the_cli_plans_a_preset_on_a_slice_of_more_devices_than_the_machine_has(tmp_path):
  cmd = [sys.executable, "-m", "scope_jax.cli", "sweep", "--config", "configs/gemma2.py:size=27b", "--workdir"]
  done = subprocess.run(
    [*cmd, str(tmp_path), "--dry_run", "--target", "v4-32"], cwd=REPO, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr
  assert "v4-32: 16 × TPU v4 (32 GB each)" in done.stdout and "train/res.22-8B" in done.stdout
  bad = subprocess.run([*cmd, str(tmp_path), "--dry_run", "--target", "tpu9"], cwd=REPO, capture_output=True, text=True)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("scope-jax sweep: unknown target 'tpu9'")
  run = subprocess.run([*cmd, str(tmp_path), "--target", "v4-32"], cwd=REPO, capture_output=True, text=True)
  assert run.returncode == 1 and "--target plans a sweep for another slice: add --dry_run" in run.stderr


def test_a_single_train_plans_on_a_slice_and_bad_plans_are_one_line(tmp_path):
  cmd = [sys.executable, "-m", "scope_jax.cli", "train", "--config", "configs/local.py", "--workdir", str(tmp_path)]
  done = subprocess.run([*cmd, "--dry_run", "--target", "h100x8"], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  row = next(line for line in done.stdout.splitlines() if line.startswith("train/res.6"))
  assert row.split()[1:4] == ["8×1", row.split()[2], "yes"]  # 6 small SAEs: data parallel, fits
  assert "h100x8: 8 × H100 SXM (80 GB each)" in done.stdout
  assert not any(tmp_path.iterdir())  # a plan writes nothing
  for args, message in [
    (["--dry_run"], "train --dry_run prints what the job needs on a slice: add --target"),
    (["--dry_run", "--target", "h100x7"], "unknown target 'h100x7'"),
    (["--target", "h100x8"], "--target plans a train for another slice: add --dry_run"),
  ]:
    bad = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"scope-jax train: {message}")
