"""The training loop as users run it: preemption and kill -9 resume bit-identically, divergence
stops with a message, metrics reach metrics.jsonl and TensorBoard, bad runs are refused."""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto.event_pb2 import Event

from scope_jax.activations.store import StoreError
from scope_jax.config import default_config
from scope_jax.data import ArraySource
from scope_jax.data.batch import Batch
from scope_jax.layout import open_workdir
from scope_jax.parallel.mesh import make_mesh
from scope_jax.train import TrainingDiverged, checkpoints, train
from tests.helpers import cli_command, tree_hashes

REPO = Path(__file__).resolve().parents[2]


def _cli(workdir, npy, *extra, command="train"):
  cfg = f"{REPO}/configs/sweep_from_npy.py:path={npy},widths=1024+2048,l1=0.001+0.01,steps=60,batch_size=512,runlocal"
  return cli_command(command, cfg, workdir, "--config.train.checkpoint_every=10", *extra)


def _checkpoints(workdir) -> list[int]:
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _run_until(cmd, condition, sig, timeout=240):
  """Starts `cmd`, sends `sig` once `condition()` holds, returns the exit code."""
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"finished before the signal:\n{proc.stdout.read()}"
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _final_state(workdir, step):
  return jax.tree.leaves(ocp.StandardCheckpointer().restore(Path(workdir) / "checkpoints" / str(step) / "state"))


@pytest.fixture(scope="module")
def acts_npy(tmp_path_factory):
  path = tmp_path_factory.mktemp("acts") / "acts.npy"
  rng = np.random.default_rng(0)
  np.save(path, (rng.normal(size=(20_000, 256)) * rng.uniform(0.2, 3, 256)).astype(np.float32))
  return path


DENSE = "--config.train.step=dense"  # runs compared bit for bit: `auto` chooses its step by timing


@pytest.fixture(scope="module")
def dense_run(acts_npy, tmp_path_factory):
  """The 60-step dense run straight through (checkpoints 40, 50, 60): what every interrupted or
  damaged run must end equal to, and (copied; nothing in a workdir names its own path) the
  finished run the damage tests start from. Never modified."""
  path = tmp_path_factory.mktemp("dense") / "run"
  subprocess.run(_cli(path, acts_npy, DENSE), cwd=REPO, check=True, capture_output=True)
  assert _checkpoints(path) == [40, 50, 60]
  return path


def test_sigterm_ctrl_c_and_kill_9_resume_bit_identically(tmp_path, acts_npy, dense_run):
  """`train.step=dense` (and `sparse`, below): `auto` chooses by timing, so two separate runs can
  switch at different steps and then differ by float rounding."""
  straight, interrupted = dense_run, tmp_path / "interrupted"

  preempted_at = 0
  for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):  # Ctrl-C saves what SIGTERM saves
    before = preempted_at
    rc, out = _run_until(
      _cli(interrupted, acts_npy, DENSE), lambda b=before: any(c > b for c in _checkpoints(interrupted)), sig
    )
    assert rc == code, out
    preempted_at = _checkpoints(interrupted)[-1]
    assert before < preempted_at < 60 and f"{sig.name}: saved a checkpoint at step {preempted_at}" in out
    assert "Traceback" not in out

  rc, out = _run_until(
    _cli(interrupted, acts_npy, DENSE), lambda: _checkpoints(interrupted)[-1] > preempted_at, signal.SIGKILL
  )
  assert rc == -signal.SIGKILL, out
  assert _checkpoints(interrupted)[-1] < 60, "killed too late to test anything"
  holder = json.loads((interrupted / "LEASE").read_text())  # left by the killed run; does not block the next
  assert holder["pid"] > 0 and holder["host"]

  subprocess.run(_cli(interrupted, acts_npy, DENSE), cwd=REPO, check=True, capture_output=True)
  for a, b in zip(_final_state(straight, 60), _final_state(interrupted, 60), strict=True):
    np.testing.assert_array_equal(a, b)
  lines = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
  steps = [(r["step"], r["sae"]) for r in lines]
  assert len(steps) == len(set(steps)) == 6 * 4  # logged every 10 steps, 4 SAEs, no step twice


def test_kill_9_resumes_the_sparse_step_bit_identically(tmp_path, acts_npy):
  """`train.step=sparse` with its automatic capacity and lazy Adam: the capacity in use is kept
  beside each checkpoint, so the resumed run makes the same sparse-or-dense choice at every step,
  and each latent's `latent_step` travels with the Adam state."""
  sparse = ("--config.train.step=sparse", "--config.recipe.init_threshold=0.15")  # L0 ≈ 1% from the start
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  subprocess.run(_cli(straight, acts_npy, *sparse), cwd=REPO, check=True, capture_output=True)
  rc, out = _run_until(_cli(interrupted, acts_npy, *sparse), lambda: _checkpoints(interrupted), signal.SIGKILL)
  assert rc == -signal.SIGKILL, out
  assert _checkpoints(interrupted)[-1] < 60, "killed too late to test anything"
  subprocess.run(_cli(interrupted, acts_npy, *sparse), cwd=REPO, check=True, capture_output=True)
  for a, b in zip(_final_state(straight, 60), _final_state(interrupted, 60), strict=True):
    np.testing.assert_array_equal(a, b)
  saved = ocp.StandardCheckpointer().restore(interrupted / "checkpoints" / "60" / "state")
  latent_step = np.concatenate([np.ravel(a) for a in jax.tree.leaves(saved["opt_state"]["latent_step"])])
  assert 0.05 < np.mean(latent_step < 60), "lazy Adam skipped no latent: the resume did not test it"
  lines = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
  assert all(r["sparse"] == 1 for r in lines), [(r["step"], r["sae"], r["slots_max"]) for r in lines]
  selection = json.loads((interrupted / "checkpoints" / "60" / "selection" / "metadata").read_text())
  assert selection["running"] == "sparse" and selection["capacities"] == [256, 256]


class _PoisonedSource(ArraySource):
  """Finite batches until `bad_step`, then a batch with a NaN row."""

  def __init__(self, *args, bad_step, **kwargs):
    super().__init__(*args, **kwargs)
    self.bad_step = bad_step

  def batch(self, step):
    x = super().batch(step).x_bd
    return Batch(x.at[3, 0].set(np.nan) if step >= self.bad_step else x)


def _small_config(steps=40):
  c = default_config()
  c.sweep.widths, c.sweep.l1_coefficients = [32, 64], [1e-3, 1e-2]
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 64, steps, 5, 10
  c.recipe.lr = 1e-3
  return c


def _data(n=2048, d=16):
  return np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)


def test_a_nan_loss_stops_the_run_naming_sae_and_step_and_keeps_the_last_checkpoint(tmp_path):
  mesh = make_mesh(data=4, model=2)
  source = _PoisonedSource(_data(), 64, mesh, bad_step=23)
  with pytest.raises(
    TrainingDiverged,
    match=r"SAE w32-l0.001-s0: loss became NaN or Inf at step 23; "
    r"the last checkpoint \(step 20\) is kept",
  ):
    train(_small_config(), tmp_path, source, progress=False)
  assert _checkpoints(tmp_path) == [10, 20]


def _read_events(directory: Path) -> list[Event]:
  events = []
  for path in directory.glob("events.out.tfevents.*"):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      events.append(Event.FromString(data[i + 12 : i + 12 + n]))
      i += 12 + n + 4
  return events


def test_metrics_reach_jsonl_and_tensorboard(tmp_path):
  mesh = make_mesh(data=4, model=2)
  train(_small_config(20), tmp_path, ArraySource(_data(), 64, mesh), progress=False)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert sorted({r["sae"] for r in rows}) == ["w32-l0.001-s0", "w32-l0.01-s0", "w64-l0.001-s0", "w64-l0.01-s0"]
  assert sorted({r["step"] for r in rows}) == [5, 10, 15, 20]
  for key in (
    "loss",
    "mse",
    "l0",
    "fvu",
    "dead_fraction",
    "threshold_mean",
    "threshold_min",
    "threshold_max",
    "grad_norm",
    "l1_coefficient",
    "window_fraction",
    "threshold_p10",
    "threshold_p50",
    "threshold_p90",
    "threshold_moved",
    "b_dec_drift",
  ):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert all(0 < r["l0"] <= 64 for r in rows)
  assert any(r["window_fraction"] > 0 for r in rows)
  assert all(
    0 <= r["window_fraction"] < 1
    and r["threshold_min"] <= r["threshold_p10"] <= r["threshold_p50"] <= r["threshold_p90"] <= r["threshold_max"]
    and r["b_dec_drift"] > 0
    for r in rows
  )
  assert json.loads((tmp_path / "train_health.json").read_text())["step"] == 20
  scalars = {(v.tag, e.step): v.simple_value for e in _read_events(tmp_path / "tensorboard") for v in e.summary.value}
  last = rows[-1]
  assert scalars[(f"{last['sae']}/fvu", 20)] == pytest.approx(last["fvu"], rel=1e-6)
  assert len(scalars) == len(rows) * (len(last) - 2)


def test_health_warnings_name_untrained_thresholds_and_l0_deaf_to_lambda():
  from scope_jax.train.health import health_warnings
  from scope_jax.train.stacked import make_groups

  groups = make_groups([32, 64], [1e-3, 1e-2])
  last = {
    "w32-l0.001-s0": {"l0": 20.0, "threshold_moved": 3.0},
    "w32-l0.01-s0": {"l0": 8.0, "threshold_moved": 0.05, "window_fraction": 0.0},
    "w64-l0.001-s0": {"l0": 20.0, "threshold_moved": 2.0},
    "w64-l0.01-s0": {"l0": 21.0, "threshold_moved": 2.0},
  }
  found = health_warnings(last, groups, 100)
  assert found == [
    "SAE w32-l0.01-s0: thresholds moved 5.0% of their initial value in 100 steps; they are not training (0.00% of "
    "pre-activations fall inside the kernel window: recipe.bandwidth may be too small for the data's scale, or "
    "recipe.lr too low)",
    "SAEs of width 64 (seed 0): L0 does not fall as λ rises (λ 0.001: L0 20.0, λ 0.01: L0 21.0); the sparsity "
    "penalty is not acting (too few steps after its warm-up, or λ too small to matter)",
  ]


def test_a_bandwidth_too_narrow_to_train_thresholds_is_warned_about(tmp_path):
  mesh = make_mesh(data=4, model=2)
  c = _small_config(20)
  c.recipe.bandwidth = 1e-12
  with pytest.warns(UserWarning, match=r"SAE w32-l0.001-s0: thresholds moved 0.0% of their initial value in 20 steps"):
    train(c, tmp_path, ArraySource(_data(), 64, mesh), progress=False)
  assert len(json.loads((tmp_path / "train_health.json").read_text())["warnings"]) >= 4


def test_resuming_with_another_config_is_refused_naming_the_fields(tmp_path):
  mesh = make_mesh(data=4, model=2)
  source = ArraySource(_data(), 64, mesh)
  train(_small_config(10), tmp_path, source, progress=False)
  changed = _small_config(20)
  changed.sweep.l1_coefficients = [1e-3, 3e-2]
  changed.recipe.lr = 3e-4
  with pytest.raises(
    ValueError,
    match=r"another run; differing fields:\n  recipe.lr: 0.001 -> 0.0003\n"
    r"  sweep.l1_coefficients: \[0.001, 0.01\] -> \[0.001, 0.03\]",
  ):
    train(changed, tmp_path, source, progress=False)
  longer = train(_small_config(20), tmp_path, source, progress=False)  # more steps is fine
  assert int(longer["step"]) == 20


def test_a_checkpoint_from_before_a_new_recipe_field_resumes_at_its_default(tmp_path, monkeypatch):
  mesh = make_mesh(data=4, model=2)
  source = ArraySource(_data(), 64, mesh)
  without_clip = lambda config, source: {
    **identity(config, source),
    "recipe": {k: v for k, v in config.recipe.to_dict().items() if k != "clip_grad_norm"},
  }
  identity = checkpoints.run_identity
  with monkeypatch.context() as m:
    m.setattr(checkpoints, "run_identity", without_clip)
    train(_small_config(10), tmp_path, source, progress=False)
  assert int(train(_small_config(20), tmp_path, source, progress=False)["step"]) == 20
  changed = _small_config(30)
  changed.recipe.clip_grad_norm = 1.0
  with pytest.raises(ValueError, match=r"recipe.clip_grad_norm: 0.0 -> 1.0"):
    train(changed, tmp_path, source, progress=False)


def test_a_checkpoint_of_the_earlier_state_layout_resumes_converted(tmp_path):
  """A checkpoint written before W_enc became latent-major (`[S, d, M]`, no `latent_step`, no
  `state_layout` in its identity) is converted on restore and the run goes on as if it had never
  stopped. That layout's Adam updated every latent, so `lazy_adam=False` here makes the two runs
  comparable bit for bit."""
  source = ArraySource(_data(), 64, make_mesh(data=4, model=2))

  def config(steps):
    c = _small_config(steps)
    c.recipe.lazy_adam = False
    return c

  straight = jax.device_get(train(config(20), tmp_path / "straight", source, progress=False))
  old = tmp_path / "old"
  state = jax.device_get(train(config(10), old, source, progress=False))
  swap = lambda p: p.replace(W_enc=np.swapaxes(p.W_enc, -1, -2))
  opt = {k: tuple(map(swap, v)) for k, v in state["opt_state"].items() if k != "latent_step"}
  layout_1 = state | {"params": tuple(map(swap, state["params"])), "opt_state": opt}
  identity = {k: v for k, v in checkpoints.run_identity(config(10), source).items() if k != "state_layout"}
  shutil.rmtree(old / "checkpoints")
  mngr = ocp.CheckpointManager((old / "checkpoints").absolute(), item_names=("state", "identity"))
  mngr.save(10, args=ocp.args.Composite(state=ocp.args.StandardSave(layout_1), identity=ocp.args.JsonSave(identity)))
  mngr.wait_until_finished()
  mngr.close()

  resumed = jax.device_get(train(config(20), old, source, progress=False))
  assert int(resumed["step"]) == 20
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_a_newer_state_layout_is_refused_and_kept(tmp_path, monkeypatch):
  source = ArraySource(_data(), 64, make_mesh(data=4, model=2))
  identity = checkpoints.run_identity
  with monkeypatch.context() as m:
    m.setattr(checkpoints, "run_identity", lambda *a: identity(*a) | {"state_layout": 3})
    train(_small_config(10), tmp_path, source, progress=False)
  before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
  with pytest.raises(ValueError, match=r"checkpoints/10: a checkpoint of state layout 3, written by a newer scope_jax"):
    train(_small_config(20), tmp_path, source, progress=False)
  assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()} == before


def test_data_of_another_width_is_refused(tmp_path):
  c = _small_config()
  c.data.width = 32
  mesh = make_mesh(data=4, model=2)
  with pytest.raises(ValueError, match="data width 16 .* differs from config.data.width 32"):
    train(c, tmp_path, ArraySource(_data(), 64, mesh), progress=False)


def test_train_and_export_commands(tmp_path, acts_npy):
  cfg = (
    f"{REPO}/configs/sweep_from_npy.py:path={acts_npy},"
    "widths=512,l1=0.001+0.03,steps=30,batch_size=256,runlocal,site=res.4"
  )
  env = dict(os.environ)
  for command in ("train", "export"):
    done = subprocess.run(
      [sys.executable, "-m", "scope_jax.cli", command, "--config", cfg, "--workdir", str(tmp_path)],
      cwd=REPO,
      capture_output=True,
      text=True,
      env=env,
    )
    assert done.returncode == 0, done.stderr
  index = json.loads((tmp_path / "export" / "index.json").read_text())
  assert [e["name"] for e in index] == ["w512-l0.001-s0", "w512-l0.03-s0"]
  assert index[0]["l0"] > index[1]["l0"] > 0
  for e in index:
    npz = Path(e["gemma_scope"])
    assert npz.relative_to(tmp_path / "export" / "gemma-scope").parts[:3] == ("res", "layer_4", "width_512")
    assert npz.parent.name == f"average_l0_{round(e['l0'])}"
    assert (Path(e["saelens"]) / "sparsity.safetensors").exists()
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "scope_jax.cli",
      "train",
      "--config",
      cfg.replace(str(acts_npy), "/nope.npy"),
      "--workdir",
      str(tmp_path / "x"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert bad.returncode == 1 and "data.path /nope.npy: no such file" in bad.stderr


def test_a_store_of_another_width_or_an_unfinished_store_is_refused(tmp_path):
  from tests.data.stores import SITE, write_store

  write_store(tmp_path / "done")
  write_store(tmp_path / "half", finish=False)
  c = _small_config()
  c.site, c.data.width = SITE, 16
  c.data.path = str(tmp_path / "done")
  with pytest.raises(ValueError, match=r"site res.0: width 8, but the config expects 16"):
    train(c, tmp_path / "w1", progress=False)
  c.data.path, c.data.width = str(tmp_path / "half"), None
  with pytest.raises(StoreError, match=r"half: unfinished"):
    train(c, tmp_path / "w2", progress=False)


def test_training_from_a_store(tmp_path):
  from tests.data.stores import SITE, write_store

  write_store(tmp_path / "store")
  c = _small_config(12)
  c.site, c.data.path = SITE, str(tmp_path / "store")
  state = train(c, tmp_path / "w", progress=False)
  assert int(state["step"]) == 12
  assert (tmp_path / "w" / "checkpoints" / "12").exists()


def test_two_trainings_on_one_workdir_one_proceeds_the_other_names_the_holder(tmp_path, acts_npy, dense_run):
  single, shared = dense_run, tmp_path / "shared"
  first = subprocess.Popen(_cli(shared, acts_npy, DENSE), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  while not (shared / "LEASE").exists():
    assert first.poll() is None, first.stdout.read().decode()
    time.sleep(0.01)
  other_lambda = subprocess.run(
    _cli(shared, acts_npy, "--config.sweep.l1_coefficients=(0.003,)"), cwd=REPO, capture_output=True, text=True
  )
  # refused, not made to wait (no wall-clock bound, which a loaded machine breaks)
  assert other_lambda.returncode == 1, other_lambda.stderr
  assert f"workdir {shared} is in use by another job (host " in other_lambda.stderr
  assert f"pid {first.pid}," in other_lambda.stderr
  out, _ = first.communicate(timeout=240)
  assert first.returncode == 0, out.decode()
  for a, b in zip(_final_state(single, 60), _final_state(shared, 60), strict=True):
    np.testing.assert_array_equal(a, b)
  assert (shared / "metrics.jsonl").read_text() == (single / "metrics.jsonl").read_text()
  assert not (shared / "LEASE").exists()  # released at the end


def test_disk_full_while_checkpointing_is_one_clear_error_and_resumes(acts_npy, small_disk, dense_run):
  disk, resize = small_disk
  straight, workdir = dense_run, disk / "w"
  full = subprocess.run(_cli(workdir, acts_npy, DENSE), cwd=REPO, capture_output=True, text=True, timeout=240)
  assert full.returncode == 1, full.stderr
  lines = full.stderr.splitlines()  # orbax's own log of the failed write may come before or after
  ours = next(i for i, line in enumerate(lines) if line.startswith("scope-jax train: "))
  assert "No space left on device" in lines[ours]
  assert lines[ours + 1] == "the disk is full: free space and run the same command; it resumes from what was committed"
  assert _checkpoints(workdir) == []
  resize("512m")
  subprocess.run(_cli(workdir, acts_npy, DENSE), cwd=REPO, check=True, capture_output=True, timeout=240)
  for a, b in zip(_final_state(straight, 60), _final_state(workdir, 60), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_checkpoints_path_that_is_a_file_fails_at_once(tmp_path, acts_npy):
  open_workdir(tmp_path)  # a run's workdir, in which something made checkpoints a file
  (tmp_path / "checkpoints").write_text("not a directory")
  started = time.time()
  done = subprocess.run(_cli(tmp_path, acts_npy), cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and time.time() - started < 60
  expected = f"scope-jax train: {tmp_path / 'checkpoints'} is a file, not a directory; move it away"
  assert done.stderr.strip().endswith(expected), done.stderr
  assert (tmp_path / "checkpoints").read_text() == "not a directory"


def test_a_rerun_with_nothing_to_do_changes_no_file(tmp_path, acts_npy):
  cmd = _cli(tmp_path, acts_npy, "--config.train.steps=20")
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
  before = tree_hashes(tmp_path)
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert again.returncode == 0 and "train: step 20" in again.stdout, again.stderr
  assert tree_hashes(tmp_path) == before


def test_fewer_steps_than_the_checkpoint_are_refused_and_nothing_changes(tmp_path):
  mesh = make_mesh(data=4, model=2)
  train(_small_config(20), tmp_path, ArraySource(_data(), 64, mesh), progress=False)
  before = tree_hashes(tmp_path)
  with pytest.raises(ValueError, match=r"train.steps = 10, but .*checkpoints holds a checkpoint of step 20; set"):
    train(_small_config(10), tmp_path, ArraySource(_data(), 64, mesh), progress=False)
  assert tree_hashes(tmp_path) == before


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_a_damaged_one_is_named(tmp_path):
  mesh = make_mesh(data=4, model=2)
  train(_small_config(10), tmp_path, ArraySource(_data(), 64, mesh), progress=False)
  metrics = tmp_path / "metrics.jsonl"
  whole = metrics.read_text()
  metrics.write_text(whole + '{"step": 15, "sae": "w3')  # what a crash mid-write leaves
  train(_small_config(20), tmp_path, ArraySource(_data(), 64, mesh), progress=False)
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  steps = [(r["step"], r["sae"]) for r in records]
  assert len(steps) == len(set(steps)) == 4 * 4 and metrics.read_text().startswith(whole)

  lines = metrics.read_text().splitlines(keepends=True)
  metrics.write_text("".join(lines[:3] + ["{oops\n"] + lines[3:]))
  before = tree_hashes(tmp_path)
  with pytest.raises(ValueError, match=rf"{metrics}: line 4 is not JSON .*; remove or repair it to resume"):
    train(_small_config(30), tmp_path, ArraySource(_data(), 64, mesh), progress=False)
  assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize(
  "rows, expected",
  [
    (np.arange(4096 * 16).reshape(4096, 16), r"dtype int64; expected activations as float32 or float64 or bfloat16"),
    (np.ones((1, 16), np.float32), r"1 rows, fewer than one batch \(train.batch_size 512\)"),
    (np.ones((4096, 16), np.float16), r"dtype float16; expected activations as float32"),
    (np.full((4096, 16), np.nan, np.float32), r"4096 of 4096 rows hold NaN or Inf \(the first: row 0\)"),
  ],
  ids=["integers", "one row", "float16", "all NaN"],
)
def test_a_npy_that_is_not_activations_is_refused_naming_the_file(tmp_path, rows, expected):
  npy = tmp_path / "acts.npy"
  np.save(npy, rows)
  done = subprocess.run(_cli(tmp_path / "w", npy), cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
  assert re.search(rf"scope-jax train: {re.escape(str(npy))}: {expected}", done.stderr), done.stderr
  assert not (tmp_path / "w" / "checkpoints").exists() or not list((tmp_path / "w" / "checkpoints").iterdir())


def _run(cmd, **kwargs):
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, **kwargs)


SHORT = "--config.train.steps=20"
SHORT_DENSE = (SHORT, DENSE)


def test_disk_full_while_exporting_is_one_clear_error_and_the_rerun_exports(tmp_path, acts_npy, small_disk):
  disk, resize = small_disk
  resize("512m")
  straight, workdir = tmp_path / "straight", disk / "w"
  assert _run(_cli(straight, acts_npy, *SHORT_DENSE)).returncode == 0
  shutil.copytree(straight, workdir)  # the same trained run, on the small disk
  assert _run(_cli(straight, acts_npy, *SHORT_DENSE, command="export")).returncode == 0
  resize(f"{shutil.disk_usage(disk).used // 1024 + 256}k")  # room for the checkpoints, not the export
  full = _run(_cli(workdir, acts_npy, *SHORT_DENSE, command="export"))
  assert full.returncode == 1 and "No space left on device" in full.stderr, full.stderr
  assert full.stderr.strip().endswith("free space and run the same command; it resumes from what was committed")
  assert not (workdir / "stages" / "export.json").exists() and not (workdir / "export").exists()
  resize("512m")
  assert _run(_cli(workdir, acts_npy, *SHORT_DENSE, command="export")).returncode == 0
  for a, b in zip(*(json.loads((w / "export" / "index.json").read_text()) for w in (straight, workdir)), strict=True):
    with np.load(a["gemma_scope"]) as za, np.load(b["gemma_scope"]) as zb:
      assert za.files == zb.files and all(np.array_equal(za[k], zb[k]) for k in za.files)


def test_a_changed_export_field_is_refused_until_redone(tmp_path, acts_npy):
  assert _run(_cli(tmp_path, acts_npy, SHORT)).returncode == 0
  assert _run(_cli(tmp_path, acts_npy, SHORT, command="export")).returncode == 0
  before = tree_hashes(tmp_path)
  changed = _run(_cli(tmp_path, acts_npy, SHORT, "--config.export.batches=3", command="export"))
  assert changed.returncode == 1 and "Traceback" not in changed.stderr, changed.stderr
  assert re.search(r"other export fields:\n  export.batches: \d+ -> 3\nadd --redo=export to replace it", changed.stderr)
  assert tree_hashes(tmp_path) == before
  redone = _run(_cli(tmp_path, acts_npy, SHORT, "--config.export.batches=3", "--redo=export", command="export"))
  assert redone.returncode == 0, redone.stderr
  assert {e["measured_rows"] for e in json.loads((tmp_path / "export" / "index.json").read_text())} == {3 * 512}


def test_a_finished_workdir_on_a_read_only_disk_reruns_with_nothing_to_do(acts_npy, small_disk):
  disk, resize = small_disk
  resize("512m")
  assert _run(_cli(disk / "w", acts_npy, SHORT)).returncode == 0
  before = tree_hashes(disk / "w")
  subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
  again = _run(_cli(disk / "w", acts_npy, SHORT))
  assert again.returncode == 0 and "train: step 20" in again.stdout, again.stderr
  assert tree_hashes(disk / "w") == before


def _damage(step_dir: Path, how: str) -> None:
  """Truncates (as a disk fault leaves them) or flips one bit in each of a checkpoint's array data files
  (orbax keeps per-process databases and a merged one; which a restore reads varies, so all are damaged)."""
  for data in (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
    raw = bytearray(data.read_bytes())
    if how == "truncate":
      data.write_bytes(raw[: len(raw) // 2])
    else:
      raw[len(raw) // 2] ^= 0x08
      data.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncate", "flip a bit"])
def test_a_damaged_newest_checkpoint_is_named_set_aside_and_the_run_ends_as_if_it_never_was(
  tmp_path, acts_npy, dense_run, how
):
  straight, damaged = dense_run, tmp_path / "damaged"
  shutil.copytree(dense_run, damaged)
  _damage(damaged / "checkpoints" / "60", how)
  kept = tree_hashes(damaged / "checkpoints" / "60")
  again = subprocess.run(_cli(damaged, acts_npy, DENSE), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
  expected = f"scope_jax: the checkpoint of step 60 ({damaged / 'checkpoints' / '60'}) is damaged ("
  assert expected in again.stderr and "resuming from the intact checkpoint of step 50" in again.stderr
  aside = [p for p in (damaged / "checkpoints").iterdir() if p.name.startswith(".damaged-60-")]
  assert len(aside) == 1 and tree_hashes(aside[0]) == kept  # moved, every byte kept
  for a, b in zip(_final_state(straight, 60), _final_state(damaged, 60), strict=True):
    np.testing.assert_array_equal(a, b)


_UNREAD_TASK_ERRORS = """
import asyncio, gc, logging, sys
from pathlib import Path
import jax, numpy as np, tensorstore as ts
from orbax.checkpoint._src.serialization import serialization
from scope_jax.train import checkpoints
logging.basicConfig()
checkpoints._ignore_orphaned_reads()
spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": sys.argv[1]}}
ts.open(spec | {"metadata": {"shape": [1000], "dtype": "<f4", "chunks": [1000]}}, create=True).result().write(
  np.arange(1000, dtype=np.float32)).result()
chunk = Path(sys.argv[1]) / "0"
chunk.write_bytes(chunk.read_bytes()[:100])  # truncated, as a disk fault leaves it

async def other_read():
  raise OSError("not orbax's")

async def main():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tasks = [asyncio.ensure_future(serialization.async_deserialize(sharding, spec)), asyncio.ensure_future(other_read())]
  await asyncio.sleep(1.0)
  print("done, never read:", [t.done() for t in tasks])  # t.exception() would read the error

asyncio.run(main())
gc.collect()
"""


def test_a_failed_restores_unread_orbax_task_errors_are_silenced_and_any_other_is_still_reported(tmp_path):
  """orbax gathers a restore's reads as tasks; after the first fails, the others' errors are never
  read and asyncio logs each, with a traceback, when its task is collected (CI saw dozens after a
  truncated checkpoint was already set aside). Only those raised in orbax's code are dropped."""
  run = subprocess.run(
    [sys.executable, "-c", _UNREAD_TASK_ERRORS, str(tmp_path / "array")], cwd=REPO, capture_output=True, text=True
  )
  assert run.returncode == 0 and "done, never read: [True, True]" in run.stdout, run.stderr
  assert run.stderr.count("Task exception was never retrieved") == 1, run.stderr
  assert "OSError: not orbax's" in run.stderr and "serialization.py" not in run.stderr, run.stderr


def test_when_no_checkpoint_is_intact_the_error_names_each_and_nothing_moves(tmp_path):
  mesh = make_mesh(data=4, model=2)
  train(_small_config(20), tmp_path, ArraySource(_data(), 64, mesh), progress=False)
  for step in (10, 20):
    _damage(tmp_path / "checkpoints" / str(step), "truncate")
  before = tree_hashes(tmp_path)
  with pytest.raises(
    ValueError, match=r"no checkpoint restores whole; each failed:\n  step 20 \(.*\n  step 10 \("
  ) as e:
    train(_small_config(30), tmp_path, ArraySource(_data(), 64, mesh), progress=False)
  assert "nothing was moved or removed" in str(e.value)
  assert tree_hashes(tmp_path) == before


def _address_space(limit: int):
  import resource

  return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_a_job_too_wide_for_memory_is_refused_before_allocating_naming_need_and_have(tmp_path):
  """4M latents at d 640 under an 8 GB address-space limit once hung in a futex wait, its lease renewed."""
  npy = tmp_path / "acts640.npy"
  np.save(npy, np.random.default_rng(0).normal(size=(1024, 640)).astype(np.float32))
  cfg = f"{REPO}/configs/sweep_from_npy.py:path={npy},widths=4194304,l1=0.001,steps=10,batch_size=512"
  cmd = [sys.executable, "-m", "scope_jax.cli", "train", "--config", cfg, "--workdir", str(tmp_path / "w")]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  limited = subprocess.run(
    cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env, preexec_fn=_address_space(8 * 10**9)
  )
  assert limited.returncode == 1 and "Traceback" not in limited.stderr, limited.stderr[-3000:]
  assert re.search(
    r"scope-jax train: this training needs about 7\d\.\d\d GiB \(20.03 GiB parameters, 40.08 GiB Adam state, .*\); "
    r"this process has \d+\.\d\d GiB \(left under the process's address-space limit \(7.45 GiB, ulimit -v\)\)\. "
    r"Train fewer or narrower SAEs per job",
    limited.stderr,
  ), limited.stderr
  assert not (tmp_path / "w" / "LEASE").exists() and not (tmp_path / "w" / "checkpoints").exists()  # nothing made
  cmd[5] = cfg.replace("widths=4194304", "widths=33554432")  # 32M latents: beyond any host of this suite
  unlimited = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert unlimited.returncode == 1 and "GiB (available host memory)" in unlimited.stderr, unlimited.stderr[-3000:]
