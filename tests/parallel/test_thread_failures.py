"""Nothing hangs: a fault in any background thread ends the process non-zero within seconds, naming
the thread (and a failed lease renewal gives the lease up)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cmd(command: str, model, workdir, *extra) -> list[str]:
  return [
    command,
    "--config",
    f"{REPO}/configs/local.py:tokens=6000,steps=400,widths=64,l1=0.001,site=res.1",
    "--workdir",
    str(workdir),
    f"--config.model={model}",
    "--config.extract.seq_len=64",
    "--config.extract.bucket_rows=512",
    "--config.extract.chunk_rows=64",
    "--config.train.batch_size=128",
    "--config.train.step=dense",
    *extra,
  ]


@pytest.fixture(scope="module")
def extracted(tiny_model, tmp_path_factory):
  """A workdir whose store is extracted (training reads it through the loader's thread)."""
  workdir = tmp_path_factory.mktemp("extracted")
  subprocess.run(
    [sys.executable, "-m", "scope_jax.cli", *_cmd("extract", tiny_model, workdir)],
    cwd=REPO,
    check=True,
    capture_output=True,
  )
  return workdir


@pytest.mark.parametrize(
  "fault, command, thread, code",
  [
    ("loader", "train", "the loader res.1 thread failed: RuntimeError: injected fault in the loader", 1),
    ("tokenizer", "extract", "the tokenizer thread failed: RuntimeError: injected fault in the tokenizer", 1),
    ("writer", "extract", "the extraction writer thread failed: RuntimeError: injected fault in the writer", 1),
    ("lease renewal", "train", "the lease renewal (", 70),
  ],
)
def test_a_fault_in_a_background_thread_ends_the_process_within_seconds_naming_it(
  tiny_model, extracted, tmp_path, fault, command, thread, code
):
  workdir = tmp_path / "w"
  if command == "train":
    shutil.copytree(extracted, workdir)
  fault_at = tmp_path / "fault_at"
  env = dict(os.environ, SCOPE_JAX_FAULT_AT=str(fault_at))
  args = [sys.executable, "-m", "tests.parallel.fault_injection", fault, *_cmd(command, tiny_model, workdir)]
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _, stderr = proc.communicate(timeout=300)
  finally:
    proc.kill()
  ended = time.time()
  assert fault_at.exists(), f"the fault was never raised:\n{stderr[-3000:]}"
  assert proc.returncode == code, stderr[-3000:]
  # generous for a loaded machine: what is tested is that it ends, not how fast (a hang runs to the timeout)
  assert ended - float(fault_at.read_text()) < 60, "the process lived on after its thread failed"
  assert f"scope_jax: {thread}" in stderr, stderr[-3000:]
  assert not (workdir / "LEASE").exists()  # given up (renewal) or released (the others)
