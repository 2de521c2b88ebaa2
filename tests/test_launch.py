"""The launch scripts: valid bash, clean under shellcheck, and doing what they say."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def test_there_are_scripts_for_tpu_slurm_and_local_runs():
  assert {p.name for p in SCRIPTS} >= {"tpu.sh", "slurm.sbatch", "local.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_n_and_shellcheck(script):
  subprocess.run(["bash", "-n", str(script)], check=True)
  shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
  result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_local_launcher_runs_n_processes_and_reports_a_failure():
  code = (
    "import os; env = os.environ; print(env['SCOPE_JAX_PROCESS_ID'], env['SCOPE_JAX_NUM_PROCESSES'], env['XLA_FLAGS'])"
  )
  ok = subprocess.run(
    [str(LAUNCH / "local.sh"), "-n", "3", "-d", "4", "--", sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert ok.returncode == 0, ok.stderr
  lines = sorted(ok.stdout.splitlines())
  assert [line.split()[:3] for line in lines] == [[f"[{i}]", str(i), "3"] for i in range(3)]
  assert all(
    line.count("device_count") == 1 and line.endswith("--xla_force_host_platform_device_count=4") for line in lines
  )
  # one process fails at once, the other would run for minutes: the launcher stops it after the grace period
  failing = "import os, sys, time; sys.exit(5) if os.environ['SCOPE_JAX_PROCESS_ID'] == '1' else time.sleep(300)"
  bad = subprocess.run(
    [str(LAUNCH / "local.sh"), "-n", "2", "-g", "2", "--", sys.executable, "-c", failing],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert bad.returncode == 5 and "process 1 exited with status 5" in bad.stderr


def test_tpu_script_runs_the_command_on_every_worker_and_deletes_the_slice(tmp_path):
  env = dict(
    os.environ,
    DRY_RUN="1",
    ZONE="europe-west4-a",
    ACCELERATOR_TYPE="v5p-16",
    PROJECT="my-project",
    LOGDIR=str(tmp_path / "logs"),
  )
  out = subprocess.run(
    [
      str(LAUNCH / "tpu.sh"),
      "all",
      "sj-test",
      "--",
      "scope-jax",
      "sweep",
      "--config",
      "configs/gemma2.py:size=2b",
      "--workdir",
      "/mnt/runs/2b",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=60,
    check=True,
  ).stdout.splitlines()
  assert out[0].startswith("gcloud compute tpus tpu-vm create sj-test --accelerator-type v5p-16")
  run = next(line for line in out if "SCOPE_JAX_DISTRIBUTED=auto" in line)
  assert "ssh sj-test --worker=all" in run and "scope-jax\\ sweep" in run and "--project my-project" in run
  assert out[-1] == "gcloud compute tpus tpu-vm delete sj-test --quiet --zone europe-west4-a --project my-project"
  assert sum("--worker=all" in line for line in out) >= 3  # wheel + configs copied, installed, run
  assert len(list((tmp_path / "logs").glob("sj-test-*.log"))) == 1  # the run's log is kept
