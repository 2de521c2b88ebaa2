"""Multi-host for real: the whole pipeline as two jax.distributed processes against a GCS
emulator equals the one-process run; a process killed with -9 stops its peer in bounded time
and a relaunch resumes from the last checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from scope_jax.activations.store import open_store
from tests.helpers import start_processes

REPO = Path(__file__).resolve().parents[2]


def _sweep_cmd(tiny_model, workdir, store):
  return [
    sys.executable,
    "-m",
    "scope_jax.cli",
    "sweep",
    "--config",
    f"{REPO}/configs/gemma2.py:size=2b,layer=1,runlocal,model={tiny_model}",
    "--workdir",
    str(workdir),
    f"--config.extract.store={store}",
    "--config.extract.tokens=20480",
    # fixed shard and stream counts: the store and the batches do not depend on the process count
    "--config.extract.shards=2",
    "--config.data.streams=2",
    # 10 steps: long enough to move every parameter, short enough that float noise in the
    # cross-process reductions is not amplified by JumpReLU's discrete threshold updates
    "--config.train.batch_size=2048",
    "--config.train.log_every=5",
    "--config.eval.bfloat16=False",
    "--config.train.step=dense",  # `auto` chooses by timing: the two runs could choose differently
    # an SAE job and a transcoder job (an mlp SAE job would run the res job's code on another site);
    # the store still holds mlp_in.1 and mlp.1 for the transcoder
    "--config.grid.kinds=('res',)",
  ]


def _npz(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _mismatch(actual: dict, desired: dict) -> dict:
  """Per tensor, the fraction of elements that differ beyond float tolerance."""
  return {k: float(np.mean(~np.isclose(actual[k], desired[k], rtol=1e-4, atol=1e-6))) for k in desired}


def test_two_process_pipeline_on_gcs_equals_the_one_process_run(gcs, tiny_model, tmp_path):
  gcs.mkdir("runs")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  one = subprocess.run(
    _sweep_cmd(tiny_model, tmp_path / "one", "gs://runs/one"),
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
  two = subprocess.run(
    [
      "bash",
      f"{REPO}/launch/local.sh",
      "-n",
      "2",
      "-d",
      "2",
      "-l",
      str(tmp_path / "logs"),
      "--",
      *_sweep_cmd(tiny_model, tmp_path / "two", "gs://runs/two"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
  assert "1 extraction jobs, 2 trainer jobs, 6 SAEs" in one.stdout

  # the stores: written by 1 and by 2 processes, equal shard for shard, row for row
  a, b = open_store("gs://runs/one/L1-20.48K"), open_store("gs://runs/two/L1-20.48K")
  assert a.shard_rows == b.shard_rows and len(a.shard_rows) == 2
  np.testing.assert_array_equal(a.read("trace", 0, a.rows), b.read("trace", 0, b.rows))
  for site in ("res.1", "mlp.1", "mlp_in.1"):
    np.testing.assert_allclose(a.read(site, 0, a.rows), b.read(site, 0, b.rows), rtol=1e-5, atol=1e-6)

  for job, n_saes in (("res.1", 4), ("transcoder.1", 2)):  # the transcoder reads mlp_in.1 -> mlp.1
    run_one, run_two = tmp_path / "one" / "train" / f"{job}-20.48K", tmp_path / "two" / "train" / f"{job}-20.48K"
    # the SAEs: equal within float tolerance
    index_one = json.loads((run_one / "export" / "index.json").read_text())
    index_two = json.loads((run_two / "export" / "index.json").read_text())
    assert [e["name"] for e in index_one] == [e["name"] for e in index_two] and len(index_one) == n_saes
    mismatch = {
      e1["name"]: _mismatch(_npz(e2["gemma_scope"]), _npz(e1["gemma_scope"])) for e1, e2 in zip(index_one, index_two)
    }
    # Cross-process reductions sum in another order (~1e-7 apart). Where a pre-activation sits at
    # the edge of JumpReLU's threshold window that can flip one discrete update and an SAE then
    # drifts a little (a few % of its thresholds); most SAEs stay within 1%. Other data or another
    # batch order changes nearly every element of every SAE (measured: 97-100%) instead. Since
    # b_dec starts at the data's mean, the exported biases (C·b_dec, C·(b_enc - b_dec·W_enc)) are
    # differences of larger numbers, so a drifted SAE shows up to ~11% of its biases off (measured).
    assert all(f <= 0.15 for m in mismatch.values() for f in m.values()), mismatch
    assert sum(all(f <= 0.01 for f in m.values()) for m in mismatch.values()) >= n_saes // 2, mismatch
    # the evaluations: equal within float tolerance
    m1 = json.loads((run_one / "report" / "metrics.json").read_text())
    m2 = json.loads((run_two / "report" / "metrics.json").read_text())
    for name in m1["float32"]:
      for metric in ("l0", "fvu", "delta_loss"):
        np.testing.assert_allclose(m2["float32"][name][metric], m1["float32"][name][metric], rtol=1e-3, atol=1e-5)
    # only process 0 wrote metrics and reports: one line per logged step, one event file
    assert len((run_two / "metrics.jsonl").read_text().splitlines()) == 2 * n_saes  # steps 5 and 10 of each SAE
    assert len(list((run_two / "tensorboard").glob("events.*"))) == 1
  # the feature browser two processes wrote (each scanned half the store's chunks) is the one
  # process's browser of the same SAEs, file for file
  from scope_jax import grid
  from scope_jax.browse import run_browse
  from tests.test_configs import load

  run_two = tmp_path / "two" / "train" / "res.1-20.48K"
  again_dir = tmp_path / "browse_again"
  shutil.copytree(run_two, again_dir, ignore=shutil.ignore_patterns("browse", "LEASE"))
  config = load("gemma2", f"size=2b,layer=1,runlocal,model={tiny_model}")
  config.extract.store, config.extract.tokens = "gs://runs/two", 20480
  config.extract.shards, config.data.streams, config.train.batch_size = 2, 2, 2048
  config.train.log_every, config.eval.bfloat16, config.train.step = 5, False, "dense"
  (job,) = [j for j in grid.plan(config, tmp_path / "two") if j.name == "train/res.1-20.48K"]
  run_browse(job.config, again_dir, progress=False)
  two_files = sorted(p.relative_to(run_two / "browse") for p in (run_two / "browse").rglob("*") if p.is_file())
  assert len(two_files) > 4 * 1024 and two_files == sorted(
    p.relative_to(again_dir / "browse") for p in (again_dir / "browse").rglob("*") if p.is_file()
  )
  differing = [f for f in two_files if (run_two / "browse" / f).read_bytes() != (again_dir / "browse" / f).read_bytes()]
  assert not differing, differing[:5]
  # every job is idempotent: the same command again skips them all
  again = subprocess.run(
    _sweep_cmd(tiny_model, tmp_path / "one", "gs://runs/one"),
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert again.returncode == 0 and again.stdout.count("finished earlier; skipped") == 3, again.stdout[-2000:]
  logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
  assert "eval: report in" in logs[0] and "eval: report in" not in logs[1]
  assert "export: 4 SAEs" in logs[0]
  assert "2 trainer jobs" in logs[0] and "2 trainer jobs" not in logs[1]  # one job table per run


def _train_cmd(npy, workdir, steps=400):
  return [
    sys.executable,
    "-m",
    "scope_jax.cli",
    "train",
    "--config",
    f"{REPO}/configs/sweep_from_npy.py:path={npy},widths=256+512,l1=1e-3+1e-2,steps={steps},batch_size=256,runlocal",
    "--workdir",
    str(workdir),
    "--config.train.checkpoint_every=25",
  ]


def test_kill_9_of_one_process_stops_the_other_in_bounded_time_and_a_relaunch_resumes(tmp_path):
  npy = tmp_path / "acts.npy"
  np.save(npy, np.random.default_rng(0).normal(size=(20_000, 64)).astype(np.float32))
  workdir = tmp_path / "run"
  # 200 steps: the survivor cannot finish without its peer, so the kill needs no margin (SIGTERM's agreement does)
  procs = start_processes(_train_cmd(npy, workdir, 200), cwd=REPO, SCOPE_JAX_HEARTBEAT_TIMEOUT="10")
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 240
  while not (checkpoints.is_dir() and any(p.name.isdigit() and int(p.name) >= 50 for p in checkpoints.iterdir())):
    assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  out, _ = procs[0].communicate(timeout=120)
  stopped_after = time.time() - killed_at
  procs[1].communicate()
  assert procs[0].returncode != 0 and stopped_after < 60, (stopped_after, out[-2000:])
  assert "another task died" in out and "stopped sending heartbeats" in out, out[-2000:]
  saved = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert 50 <= saved < 200

  procs = start_processes(_train_cmd(npy, workdir, 200), cwd=REPO)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert f"resuming from the checkpoint of step {saved}" in outs[0] and "train: step 200" in outs[0]
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # one line per SAE and logged step: none lost, none repeated by the resumed run
  assert steps == sorted(steps) and steps == [s for s in range(10, 201, 10) for _ in range(4)]


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
  """Preemption reaches hosts one by one; JAX's preemption service makes them agree on a step."""
  npy = tmp_path / "acts.npy"
  np.save(npy, np.random.default_rng(1).normal(size=(20_000, 64)).astype(np.float32))
  workdir = tmp_path / "run"
  procs = start_processes(_train_cmd(npy, workdir), cwd=REPO)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4 * 5):
    assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [143, 143], outs
  stops = [int(out.split("SIGTERM: saved a checkpoint at step ")[1].split(";")[0]) for out in outs]
  assert stops[0] == stops[1] and 50 <= stops[0] < 400
  assert max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == stops[0]
  procs = start_processes(_train_cmd(npy, workdir), cwd=REPO)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert f"resuming from the checkpoint of step {stops[0]}" in outs[1]


def test_a_two_process_job_on_a_workdir_in_use_stops_on_both_processes(tmp_path):
  """One lease per job, held by process 0; the other process learns the refusal by broadcast."""
  from scope_jax.lease import Lease

  npy = tmp_path / "acts.npy"
  np.save(npy, np.random.default_rng(0).normal(size=(2_000, 64)).astype(np.float32))
  workdir = tmp_path / "run"
  workdir.mkdir()
  held = Lease(str(workdir), "workdir")
  held.acquire()  # this test process is the other job
  try:
    procs = start_processes(_train_cmd(npy, workdir), cwd=REPO)
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    held.release()
  assert [p.returncode for p in procs] == [1, 1], outs
  assert f"workdir {workdir} is in use by another job (host " in outs[0] and f"pid {os.getpid()}," in outs[0]
  assert f"workdir {workdir} is in use by another job or cannot be used (process 0's log names it)" in outs[1]
  assert sorted(p.name for p in workdir.iterdir()) == []  # the lease was released; nothing written


def _final_state(workdir):
  """(the latest checkpoint's step, its arrays as numpy: saved on other devices than this process's)."""
  step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  path, checkpointer = workdir / "checkpoints" / str(step) / "state", ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
  return step, jax.tree.leaves(checkpointer.restore(path, restore_args=as_numpy))


def test_two_processes_run_the_sparse_step_as_one_process_does_and_agree_on_auto(tmp_path):
  """Latents split over the processes' devices (mesh 2 × 2): the sparse step's slot counts, its
  fall-back decision and `auto`'s timing are global, so every process runs the same program."""
  npy = tmp_path / "acts.npy"
  np.save(npy, np.random.default_rng(2).normal(size=(20_000, 64)).astype(np.float32))

  def cmd(workdir, kind):
    return [
      *_train_cmd(npy, workdir),
      f"--config.train.step={kind}",
      "--config.train.steps=30",
      "--config.train.log_every=5",
      "--config.mesh.model=2",
      "--config.recipe.init_threshold=0.3",  # L0 ≈ 1% from the start: the sparse step runs
    ]

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  one = subprocess.run(cmd(tmp_path / "one", "sparse"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
  procs = start_processes(cmd(tmp_path / "two", "sparse"), cwd=REPO)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  (step_one, state_one), (step_two, state_two) = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
  assert step_one == step_two == 30
  for a, b in zip(state_one, state_two, strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
  assert lines and all(r["sparse"] == 1 for r in lines)

  procs = start_processes(cmd(tmp_path / "auto", "auto"), cwd=REPO)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  decisions = [[line for line in out.splitlines() if "sparse step is faster" in line] for out in outs]
  assert decisions[0] == decisions[1], outs  # process 0's timing, broadcast
  selection = json.loads((tmp_path / "auto" / "checkpoints" / "30" / "selection" / "metadata").read_text())
  assert selection["probes"] and selection["probes"][0]["step"] == 9  # timed on steps 6-9
