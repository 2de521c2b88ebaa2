"""The finetune stage through the CLI on a tiny trained run: kill -9 and resume give the
uninterrupted run's SAEs bit for bit; eval reports them beside the originals; a finished finetune
rerun with other fields is refused; bad input (evaluation text, a site the model cannot reach, no
token budget) is refused naming what is wrong."""

import dataclasses
import importlib.util
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import scope_jax as sj
from scope_jax.config import validate
from scope_jax.eval.evaluate import OverlapError, saes_to_evaluate
from scope_jax.export.entries import index_json, read_index
from scope_jax.finetune import run_finetune
from scope_jax.finetune.stage import check_fields, check_text
from tests.helpers import cli_command

REPO = Path(__file__).resolve().parents[2]
STEPS = 150


def _cmd(command: str, model, workdir, *extra) -> list[str]:
  return cli_command(
    command,
    f"{REPO}/configs/local.py:steps=40,widths=64,l1=1e-3+3e-2,site=res.1",
    workdir,
    f"--config.model={model}",
    "--config.extract.tokens=6000",
    "--config.extract.seq_len=48",
    "--config.extract.bucket_rows=1024",
    "--config.extract.chunk_rows=64",
    "--config.train.batch_size=128",
    "--config.export.batches=4",
    "--config.eval.sequences=8",
    "--config.eval.seq_len=48",
    "--config.eval.batch_size=8",
    "--config.eval.domains=()",
    "--config.eval.quantize=()",
    "--config.eval.delta_loss_se=0",
    "--config.browse.enabled=False",
    "--config.finetune.batch_size=8",
    "--config.finetune.seq_len=48",
    f"--config.finetune.tokens={STEPS * 8 * 48}",
    "--config.finetune.lr=1e-3",
    "--config.finetune.checkpoint_every=25",
    "--config.finetune.measure_batches=1",
    *extra,
  )


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(*args, cwd=REPO, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> Path:
  """extract -> train -> export -> eval of two SAEs on the tiny model, through the CLI."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  done = _run(_cmd("run", tiny_model, workdir))
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def _copy(trained: Path, where: Path) -> Path:
  shutil.copytree(trained, where)
  return where


def _finetuned_params(workdir: Path) -> dict[str, dict[str, np.ndarray]]:
  out = {}
  for e in read_index(workdir / "finetune" / "export" / "index.json"):
    with np.load(e.files["gemma_scope"]) as z:
      out[e.name] = {k: z[k] for k in z.files}
  return out


@pytest.fixture(scope="module")
def straight(tiny_model, trained, tmp_path_factory) -> tuple[Path, dict]:
  """The finetune run straight through (and its parameters as it left them)."""
  workdir = _copy(trained, tmp_path_factory.mktemp("straight") / "run")
  done = _run(_cmd("finetune", tiny_model, workdir))
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"{STEPS} steps of 384 tokens" in done.stdout
  return workdir, _finetuned_params(workdir)


def _interrupt_and_resume(tiny_model, trained, where: Path, sig: int) -> Path:
  """A copy of the trained run at `where`, its finetune stopped by `sig` after a checkpoint, then resumed."""
  killed = _copy(trained, where)
  proc = subprocess.Popen(
    _cmd("finetune", tiny_model, killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  checkpoint, deadline = killed / "finetune" / "checkpoints" / "25", time.time() + 300
  while not checkpoint.is_dir():
    assert proc.poll() is None and time.time() < deadline, "the finetune ended before it could be stopped"
    time.sleep(0.01)
  proc.send_signal(sig)
  code, stderr = proc.wait(), proc.stderr.read()
  assert code == (-9 if sig == signal.SIGKILL else 128 + sig), stderr[-3000:]
  if sig == signal.SIGTERM:
    assert "SIGTERM: saved a checkpoint at step" in stderr
  assert not (killed / "stages" / "finetune.json").exists()
  resumed = _run(_cmd("finetune", tiny_model, killed))
  assert resumed.returncode == 0 and "resumed at step" in resumed.stdout, resumed.stderr[-3000:]
  return killed


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill -9", "SIGTERM"])
def test_an_interrupted_finetune_resumes_to_the_uninterrupted_ones_parameters(
  tiny_model, trained, straight, sig, tmp_path
):
  a, b = straight[1], _finetuned_params(_interrupt_and_resume(tiny_model, trained, tmp_path / "killed", sig))
  assert sorted(a) == ["w64-l0.001-s0-kl", "w64-l0.03-s0-kl"]
  for name in a:
    for k in a[name]:
      np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=f"{name} {k}")


def test_eval_reports_the_finetuned_saes_beside_the_originals_and_a_changed_rerun_is_refused(tiny_model, straight):
  straight, a = straight
  originals = {e.name: e for e in read_index(straight / "export" / "index.json")}
  for name, params in a.items():  # the finetune moved every SAE, and wrote it where eval finds it
    with np.load(originals[name.removesuffix("-kl")].files["gemma_scope"]) as z:
      assert not np.array_equal(z["W_enc"], params["W_enc"])

  again = _run(_cmd("finetune", tiny_model, straight))
  assert again.returncode == 0 and "up to date; skipped" in again.stdout
  evaluated = _run(_cmd("eval", tiny_model, straight))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  report = json.loads((straight / "report" / "metrics.json").read_text())
  assert set(report["float32"]) == {*originals, *a}
  assert set(report["finetune"]) == set(a)
  for name, pair in report["finetune"].items():
    assert pair["before"]["delta_loss"] == report["float32"][name.removesuffix("-kl")]["delta_loss"]
    assert pair["after"]["delta_loss"] == report["float32"][name]["delta_loss"]
  assert "KL finetuning: each SAE before and after" in (straight / "report" / "report.md").read_text()
  c = _config(tiny_model)  # export.batches 128, not the run's 4: another export's finetune is not evaluated
  with pytest.warns(UserWarning, match="KL-finetuned SAEs of an older export"):
    assert not any(name.endswith("-kl") for name in saes_to_evaluate(c, straight))
  c.export.batches = 4
  assert {name for name in saes_to_evaluate(c, straight) if name.endswith("-kl")} == set(a)
  sae = sj.load_sae(straight / "finetune" / "export" / "saelens" / "res.1-w64-l0.001-s0-kl")
  np.testing.assert_allclose(np.asarray(sae.W_enc), a["w64-l0.001-s0-kl"]["W_enc"], rtol=1e-6)

  changed = _run(_cmd("finetune", tiny_model, straight, "--config.finetune.lr=2e-3", "--config.finetune.alpha=first"))
  assert changed.returncode != 0
  assert "finetune.lr: 0.001 -> 0.002" in changed.stderr and "finetune.alpha: 'batch' -> 'first'" in changed.stderr
  assert "--redo=finetune" in changed.stderr
  assert _finetuned_params(straight)["w64-l0.001-s0-kl"]["W_enc"].tobytes() == a["w64-l0.001-s0-kl"]["W_enc"].tobytes()
  redone = _run(
    _cmd(
      "finetune", tiny_model, straight, "--config.finetune.lr=2e-3", "--config.finetune.alpha=first", "--redo=finetune"
    )
  )
  assert redone.returncode == 0 and "resumed at step" not in redone.stdout, redone.stderr[-3000:]  # from the start
  assert not np.array_equal(_finetuned_params(straight)["w64-l0.001-s0-kl"]["W_enc"], a["w64-l0.001-s0-kl"]["W_enc"])


def test_run_with_finetune_enabled_finetunes_between_export_and_eval(tiny_model, tmp_path):
  done = _run(
    _cmd("run", tiny_model, tmp_path / "run", "--config.finetune.enabled=True", "--config.finetune.tokens=384")
  )
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout
  assert out.index("export: 2 SAEs") < out.index("finetune: 2 SAEs, 1 steps") < out.index("eval: report in")
  assert "KL-finetuned SAEs (NAME-kl, the same formats)" in out
  report = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
  assert set(report["finetune"]) == {"w64-l0.001-s0-kl", "w64-l0.03-s0-kl"}


def _config(tiny_model, **finetune):
  """configs/local.py as `_cmd` sets it, with `finetune` fields."""
  spec = importlib.util.spec_from_file_location("local_config", REPO / "configs" / "local.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("steps=40,widths=64,l1=1e-3+3e-2,site=res.1")
  c.model = str(tiny_model)
  c.finetune.batch_size, c.finetune.seq_len, c.finetune.tokens = 8, 48, 8 * 48
  for k, v in finetune.items():
    setattr(c.finetune, k, v)
  return c


def test_bad_input_is_refused_naming_it(tiny_model, trained, tmp_path):
  c = _config(tiny_model)
  check_text(c)  # the local config: data.text's training documents, the held-out ones evaluated

  held_out_none = _config(tiny_model)
  held_out_none.data.holdout_every = 0
  with pytest.raises(OverlapError, match="data.holdout_every is 0 and eval.text is empty"):
    check_text(held_out_none)
  eval_text = _config(tiny_model, text=("builtin:python-stdlib",))
  with pytest.raises(OverlapError, match=r"finetune.text \['builtin:python-stdlib'\] is evaluation text"):
    check_text(eval_text)  # eval.domains reads the standard library's code whole
  with pytest.raises(OverlapError, match=r"finetune.text \['builtin:python-docs'\]"):
    check_text(_config(tiny_model, text=("builtin:python-docs",)))  # its held-out documents are evaluated

  with pytest.raises(ValueError, match=r"finetune.tokens = 0: expected an integer >= 1"):
    validate(_config(tiny_model, tokens=0))
  with pytest.raises(ValueError, match=r"finetune.tokens = 100: expected at least one batch.*384 tokens"):
    check_fields(_config(tiny_model, tokens=100))
  with pytest.raises(ValueError, match=r"finetune.alpha = 'mean': expected one of"):
    validate(_config(tiny_model, alpha="mean"))

  unreachable = _copy(trained, tmp_path / "unreachable")
  index = unreachable / "export" / "index.json"
  entries = read_index(index)
  index.write_text(index_json([dataclasses.replace(entries[0], input_site="res.7", output_site="res.7")]))
  with pytest.raises(ValueError, match=r"finetune: .*params.npz: site 'res.7': layer 7 is beyond the last layer \(2\)"):
    run_finetune(_config(tiny_model), unreachable, progress=False)
  assert not (unreachable / "finetune" / "export").exists()

  with pytest.raises(ValueError, match=r"finetune.saes \['w9\*'\] names none of the export's SAEs"):
    run_finetune(_config(tiny_model, saes=("w9*",)), trained, progress=False)
