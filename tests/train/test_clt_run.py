"""A CLT run as users run it (`configs/local.py:kind=clt` on a tiny model): extraction of every
mlp_in/mlp of the range, training killed with -9 and resumed bit-identically, export, the
replacement-model report; and the bad inputs of a CLT run."""

import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from scope_jax.config import default_config
from scope_jax.train.clt_run import open_clt_source
from tests.helpers import cli_command
from tests.train.test_trainer import _checkpoints, _final_state, _run_until

REPO = Path(__file__).resolve().parents[2]
STEPS = 60


def _cli(command, workdir, model, *extra, layers="0-2"):
  config = f"{REPO}/configs/local.py:kind=clt,layers={layers},tokens=6000,steps={STEPS},widths=48,l1=0.0003+0.001"
  return cli_command(
    command,
    config,
    workdir,
    f"--config.model={model}",
    "--config.train.batch_size=128",
    "--config.train.checkpoint_every=10",
    "--config.train.log_every=10",
    "--config.export.batches=4",
    "--config.eval.sequences=8",
    "--config.eval.seq_len=64",
    "--config.eval.replacement_layer_sequences=8",
    *extra,
  )


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
  """Extraction, then 60 steps straight through (checkpoints every 10)."""
  workdir = tmp_path_factory.mktemp("clt") / "straight"
  for command in ("extract", "train"):
    done = subprocess.run(_cli(command, workdir, tiny_model), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def test_kill_9_resumes_bit_identically(straight, tiny_model, tmp_path):
  interrupted = tmp_path / "interrupted"
  shutil.copytree(straight / "activations", interrupted / "activations")  # the same store, not re-extracted
  cmd = _cli("train", interrupted, tiny_model, f"--config.extract.store={interrupted / 'activations'}")
  cmd_straight = _cli("train", straight, tiny_model)
  assert cmd[cmd.index("--config") + 1] == cmd_straight[cmd_straight.index("--config") + 1]
  rc, out = _run_until(cmd, lambda: _checkpoints(interrupted), signal.SIGKILL)
  assert rc == -signal.SIGKILL, out
  assert _checkpoints(interrupted)[-1] < STEPS, "killed too late to test anything"
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resuming the CLTs from the checkpoint of step" in done.stdout + done.stderr
  for a, b in zip(_final_state(straight, STEPS), _final_state(interrupted, STEPS), strict=True):
    np.testing.assert_array_equal(a, b)


def test_export_and_the_replacement_report(straight, tiny_model):
  for command in ("export", "eval"):
    done = subprocess.run(_cli(command, straight, tiny_model), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
  index = json.loads((straight / "export" / "clt_index.json").read_text())
  assert [e["name"] for e in index] == ["clt-w48-l10.0003-s0", "clt-w48-l10.001-s0"]
  assert index[0]["l0"] > index[1]["l0"] > 0, "L0 must fall as λ rises"
  assert all(len(e["l0_per_layer"]) == 3 and e["step"] == STEPS for e in index)
  assert all(Path(e["files"]["circuit_tracer"], "W_dec_2.safetensors").exists() for e in index)
  results = json.loads((straight / "report" / "replacement.json").read_text())
  for e in index:
    r = results[e["name"]]
    assert r["layers"] == [0, 1, 2] and len(r["delta_loss_per_layer"]) == 3 and r["delta_loss_se"] > 0
    assert np.isfinite(r["delta_loss"]) and all(0 < v < 2 for v in r["fvu_per_layer"])
  report = (straight / "report" / "report.md").read_text()
  assert "| clt-w48-l10.0003-s0 | clt | 0-2 |" in report


def test_a_layer_range_outside_the_model_is_refused(tiny_model, tmp_path):
  done = subprocess.run(
    _cli("extract", tmp_path / "w", tiny_model, layers="1-4"), cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert done.returncode != 0
  assert "site 'mlp_in.3': layer 3 is beyond the last layer (2)" in done.stderr, done.stderr[-2000:]


def test_a_store_missing_a_site_of_the_range_is_refused(straight):
  c = default_config()
  c.kind, c.clt.first_layer, c.clt.last_layer = "clt", 1, 3
  c.data.path, c.train.batch_size = str(straight / "activations"), 128
  with pytest.raises(ValueError, match=r"needs sites \['mlp_in.3', 'mlp.3'\], which it does not hold"):
    open_clt_source(c, straight)


def test_bad_clt_configs_name_the_field():
  from scope_jax.config import validate

  c = default_config()
  c.kind, c.clt.first_layer, c.clt.last_layer = "clt", 3, 1
  with pytest.raises(ValueError, match=r"clt.first_layer, clt.last_layer = 3, 1: expected layers 0 <= first <= last"):
    validate(c)
  c.clt.first_layer, c.clt.last_layer, c.sweep.widths = 0, 1, (64, 128)
  c.sites = ("mlp_in.0", "mlp.0", "mlp_in.1")
  with pytest.raises(ValueError, match=r"a CLT sweep trains one width") as e:
    validate(c)
  assert "needs ['mlp.1'] in the store too" in str(e.value)


def test_browse_and_slice_planning_refuse_a_clt_run_naming_the_kind(tmp_path):
  from scope_jax import cli

  c = default_config()
  c.kind = "clt"
  with pytest.raises(SystemExit, match=r"a CLT's span layers \(kind = 'clt'\)"):
    cli.stage_browse(c, tmp_path)
  with pytest.raises(SystemExit, match=r"planning a CLT job on a slice is not supported \(kind = 'clt'\)"):
    cli.stage_train_plan(c, tmp_path, "v4-8")
