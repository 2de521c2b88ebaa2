"""Evaluation: metrics on hand-computed inputs, splicing identities, official vs exported files,
bad input, and the local pipeline end to end on the embedded model."""

import collections
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import scope_jax as sj
from scope_jax.activations.extract import extract
from scope_jax.config import default_config
from scope_jax.eval.evaluate import OverlapError, eval_batches, evaluate_saes, run_eval
from scope_jax.eval.statistics import SAEStats, SiteStats, ratio_and_standard_error, sae_batch
from scope_jax.export.exporter import export
from scope_jax.sae import SAE, fold, init_sae
from scope_jax.sae.model import SAEInfo, init_transcoder
from scope_jax.train import train
from tests.helpers import tree_hashes

REPO = Path(__file__).resolve().parents[2]


def test_l0_fvu_mse_density_and_standard_errors_on_hand_computed_inputs():
  # d = 2, M = 3; latent 0 reads x0, latent 1 reads x1 (threshold 1.5), latent 2 never fires
  sae = SAE(
    W_enc=jnp.array([[1.0, 0, 0], [0, 1.0, 0]]),
    b_enc=jnp.zeros(3),
    W_dec=jnp.array([[1.0, 0], [0, 1.0], [1, 1]]),
    b_dec=jnp.zeros(2),
    threshold=jnp.array([0.5, 1.5, 0.5]),
  )
  x = np.array([[1.0, 1.0], [2.0, 2.0], [0.0, 3.0], [1.0, 0.0]], np.float32)
  # latents: [1,0,0] [2,2,0] [0,3,0] [1,0,0] -> recon [1,0] [2,2] [0,3] [1,0]; errors: 1, 0, 0, 0
  bos = np.full((1, 2), 100.0, np.float32)  # position 0 of each sequence: never counted, never spliced
  act = jnp.asarray(np.stack([np.concatenate([bos, x[:2]]), np.concatenate([bos, x[2:]])]))  # [2 seqs, 3, 2]
  keep = np.array([[False, True, True], [False, True, True]])
  spliced, sums = sae_batch(sae, act, keep)
  np.testing.assert_array_equal(np.asarray(spliced)[:, 0], np.asarray(act)[:, 0])
  np.testing.assert_allclose(np.asarray(spliced)[:, 1:].reshape(4, 2), [[1, 0], [2, 2], [0, 3], [1, 0]])
  stats, site = SAEStats(), SiteStats()
  stats.add(sums, keep.sum(1))
  site.add(act, keep)
  variance = np.mean(np.sum((x - x.mean(0)) ** 2, 1))  # 0.6875 + 1.25 = 1.9375
  assert site.variance == pytest.approx(variance) and site.mean == pytest.approx([1.0, 1.5])
  r = stats.result(site.variance)
  assert r["tokens"] == 4 and r["l0"] == pytest.approx(5 / 4) and r["mse"] == pytest.approx(1 / 4)
  assert r["fvu"] == pytest.approx(0.25 / variance)
  # per sequence: squared errors [1, 0] over [2, 2] tokens; a - R·n = [0.5, -0.5]; sqrt(2 · 0.5) / 4
  assert r["fvu_se"] == pytest.approx(0.25 / variance)
  np.testing.assert_allclose(r["density"], [3 / 4, 2 / 4, 0])
  assert r["dead_fraction"] == pytest.approx(1 / 3) and r["dense_fraction"] == pytest.approx(2 / 3)


def test_ratio_standard_error_on_hand_computed_cases():
  # equal lengths: std (ddof 1) of the per-sequence means [0.5, 1, 1.5, 3] over sqrt(4)
  ratio, se = ratio_and_standard_error([1, 2, 3, 6], [2, 2, 2, 2])
  assert ratio == pytest.approx(1.5) and se == pytest.approx(np.std([0.5, 1, 1.5, 3], ddof=1) / 2)
  # unequal lengths: R = 5/4, a - R·n = [-0.25, 0.25], sqrt(2/1 · 0.125) / 4
  assert ratio_and_standard_error([1, 4], [1, 3]) == (pytest.approx(1.25), pytest.approx(0.125))
  # sequences without tokens (padding) count for nothing; one sequence has no standard error
  assert ratio_and_standard_error([1, 4, 0], [1, 3, 0])[1] == pytest.approx(0.125)
  assert np.isnan(ratio_and_standard_error([3], [2])[1])


@pytest.fixture(scope="module")
def lm(tiny_model):
  return sj.load_model(tiny_model)


def eval_config(tiny_model, **fields):
  c = default_config()
  c.model, c.site, c.sites = str(tiny_model), "res.1", ("res.1",)
  c.data.holdout_every = 4
  c.eval.sequences, c.eval.seq_len, c.eval.batch_size, c.eval.bfloat16 = 8, 48, 8, False
  for k, v in fields.items():
    setattr(c.eval, k, v)
  return c


def perfect_sae(d: int) -> SAE:
  """f = [relu(x), relu(-x)], xhat = relu(x) - relu(-x) = x."""
  eye = jnp.eye(d)
  return SAE(
    W_enc=jnp.concatenate([eye, -eye], 1),
    b_enc=jnp.zeros(2 * d),
    W_dec=jnp.concatenate([eye, -eye], 0),
    b_dec=jnp.zeros(d),
    threshold=jnp.zeros(2 * d),
  )


def test_identity_splice_is_exactly_zero_and_a_perfect_sae_nearly(tiny_model):
  """On the real 270M (a random model is no better than zero-ablation, so it cannot show it)."""
  lm = sj.load_model("gemma3-270m", mesh=sj.make_mesh(devices=jax.devices()[:1]))
  c = eval_config(tiny_model, sequences=4, seq_len=48, batch_size=4)
  batches = eval_batches(c, lm.tokenizer)
  tokens = batches[0].tokens
  np.testing.assert_array_equal(lm.token_losses(tokens, replace={"res.1": lambda a: a}), lm.token_losses(tokens))
  d = lm.config.d_model
  random = fold(init_sae(jax.random.key(0), d, 2 * d), 30.0)
  r = evaluate_saes(lm, {"perfect": (perfect_sae(d), "res.1"), "random": (random, "res.1")}, batches, progress=False)
  perfect = r["perfect"]
  assert perfect["fvu"] < 1e-10 and abs(perfect["delta_loss"]) < 1e-5
  assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
  assert perfect["ce_zero_ablation"] > perfect["ce_clean"] + 1.0
  assert perfect["ce_zero_ablation"] > perfect["ce_spliced"] and r["random"]["ce_spliced"] > perfect["ce_spliced"]


@pytest.fixture(scope="module")
def tiny_run(lm, tiny_model, tmp_path_factory):
  """extract -> train -> export on the tiny model: a real trained sweep to evaluate."""
  workdir = tmp_path_factory.mktemp("run")
  c = eval_config(tiny_model)
  c.extract.seq_len, c.extract.batch_size, c.extract.tokens, c.extract.bucket_rows = 48, 8, 6_000, 1_024
  c.sweep.widths, c.sweep.l1_coefficients = (128,), (1e-3, 3e-2)
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 128, 40, 20, 1_000
  c.recipe.lr, c.recipe.lr_warmup_steps, c.recipe.sparsity_warmup_steps = 3e-3, 5, 10
  c.export.batches = 4
  extract(c, workdir, lm=lm, progress=False)
  train(c, workdir, progress=False)
  export(c, workdir, progress=False)
  return c, workdir


def test_official_gemma_scope_layout_gives_the_same_metrics_as_our_export(lm, tiny_run, tmp_path):
  c, workdir = tiny_run
  ours = json.loads((workdir / "export" / "index.json").read_text())[0]["gemma_scope"]
  official = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_9" / "params.npz"
  official.parent.mkdir(parents=True)
  with np.load(ours) as z:
    np.savez(official, **{k.lower(): z[k] for k in z.files})  # official files use w_enc / w_dec too
  batches = eval_batches(c, lm.tokenizer)
  r = evaluate_saes(
    lm, {"ours": (sj.load_sae(ours), "res.1"), "official": (sj.load_sae(official), "res.1")}, batches, progress=False
  )
  assert sj.load_sae(official).info.site == "res.1"
  for key in ("l0", "mse", "fvu", "ce_spliced", "delta_loss", "dead_fraction"):
    assert r["ours"][key] == r["official"][key], key


def test_run_eval_writes_the_report(lm, tiny_run):
  c, workdir = tiny_run
  out = run_eval(c, workdir, lm=lm, progress=False)
  metrics = json.loads((workdir / "report" / "metrics.json").read_text())
  assert sorted(metrics["float32"]) == ["w128-l0.001-s0", "w128-l0.03-s0"]
  low, high = metrics["float32"]["w128-l0.001-s0"], metrics["float32"]["w128-l0.03-s0"]
  assert low["l0"] > high["l0"]
  for name in ("pareto_delta_loss.png", "pareto_fvu.png", "training.png", "report.md", "report.html"):
    assert (workdir / "report" / name).exists()
  assert "w128-l0.03-s0" in (workdir / "report" / "report.md").read_text()
  assert out["files"]["html"].read_text().count("data:image/png;base64,") == 5
  assert {"delta_loss_se", "fvu_se", "ce_mean_ablation", "loss_recovered_mean"} <= set(low)


def test_domains_and_quantized_weights_are_in_the_report(lm, tiny_run, tmp_path):
  c, workdir = tiny_run
  c = ml_collections.ConfigDict(c.to_dict())
  other = tmp_path / "other.txt"
  other.write_text("\n\n".join(f"Entry {i}: the quick brown fox {i} jumps over {i * 7} lazy dogs." for i in range(400)))
  c.eval.domains = (("docs", "builtin:python-docs"), ("other", str(other)))
  c.eval.domain_sequences, c.eval.quantize, c.eval.quantize_sequences = 4, ("bfloat16", "int8"), 4
  run_eval(c, workdir, lm=lm, progress=False)
  metrics = json.loads((workdir / "report" / "metrics.json").read_text())
  names = ["w128-l0.001-s0", "w128-l0.03-s0"]
  docs, other_ = (metrics["domains"][d]["saes"] for d in ("docs", "other"))
  for name in names:  # docs is data.text's only source: its held-out part is the eval set's first batch
    assert docs[name]["delta_loss"] == pytest.approx(metrics["float32"][name]["delta_loss"], rel=1e-6)
    assert other_[name]["ce_clean"] != pytest.approx(docs[name]["ce_clean"], rel=1e-3)
    q = metrics["quantization"][name]
    assert q["float32"]["delta_loss"] == pytest.approx(metrics["float32"][name]["delta_loss"], rel=1e-6)
    assert abs(q["bfloat16"]["delta_loss_diff"]) < 0.05 and abs(q["int8"]["delta_loss_diff"]) < 0.05
  report = (workdir / "report" / "report.md").read_text()
  assert "## Δ LM loss per domain" in report and "## Quantized SAE weights (model in float32)" in report
  assert "| w128-l0.001-s0 | int8 |" in report and _is_png(workdir / "report" / "domains.png")


def test_a_domain_of_the_training_text_is_its_held_out_part(tiny_model, tmp_path):
  from scope_jax.eval.evaluate import domain_documents
  from scope_jax.text.sources import iter_documents

  other = tmp_path / "other.txt"
  other.write_text("\n\n".join(f"paragraph {i}" for i in range(30)))
  c = eval_config(tiny_model)
  c.data.text, c.data.holdout_every = ("builtin:python-docs", str(other)), 4
  first = sum(1 for _ in iter_documents("builtin:python-docs"))
  every = list(iter_documents(list(c.data.text)))
  assert list(domain_documents(c, str(other))) == [(i, t) for i, t in every if i >= first and i % 4 == 0]
  assert list(domain_documents(c, "builtin:python-docs")) == [(i, t) for i, t in every if i < first and i % 4 == 0]
  assert [t for _, t in domain_documents(c, "builtin:python-docstrings")][:3] == [
    t for _, t in list(iter_documents("builtin:python-docstrings"))[:3]
  ]  # not trained on: all of it
  c.data.holdout_every = 0
  with pytest.raises(OverlapError, match="eval.domains 'builtin:python-docs' is training text"):
    list(domain_documents(c, "builtin:python-docs"))


def test_bad_input(lm, tiny_model, tiny_run, tmp_path):
  c, _ = tiny_run
  batches = eval_batches(c, lm.tokenizer)
  wrong = fold(init_sae(jax.random.key(0), 32, 64), 1.0)
  with pytest.raises(ValueError, match=r"SAE w: input width 32 does not match site res.1 .* \(width 64\)"):
    evaluate_saes(lm, {"w": (wrong, "res.1")}, batches, progress=False)
  with pytest.raises(ValueError, match=r"site 'res.40': layer 40 is beyond the last layer \(2\)"):
    evaluate_saes(lm, {"p": (perfect_sae(64), "res.40")}, batches, progress=False)
  overlapping = eval_config(tiny_model)
  overlapping.data.holdout_every = 0
  with pytest.warns(UserWarning, match="the evaluation text is the training text"):
    eval_batches(overlapping, lm.tokenizer)
  overlapping.eval.strict = True
  with pytest.raises(OverlapError, match="data.holdout_every is 0"):
    eval_batches(overlapping, lm.tokenizer)
  with pytest.raises(
    ValueError, match=r"eval set too small: .* give 1 sequence\(s\) of 48 tokens; standard errors need"
  ):
    eval_batches(eval_config(tiny_model, sequences=1, batch_size=1), lm.tokenizer)
  with pytest.warns(
    UserWarning,
    match=r"eval set smaller than asked: .* give \d+ sequences of 48 tokens, 100000 were asked for",
  ):
    eval_batches(eval_config(tiny_model, sequences=100_000, batch_size=64), lm.tokenizer)


def test_an_eval_set_too_small_for_the_requested_standard_error_says_so(lm, tiny_run):
  c, workdir = tiny_run
  c = ml_collections.ConfigDict(c.to_dict())
  c.eval.delta_loss_se = 1e-6
  with pytest.warns(
    UserWarning,
    match=r"eval set too small for SAE w128-l0.001-s0: standard error of Δ loss "
    r"\S+ nats on 8 sequences, above eval.delta_loss_se = 1e-06; about \d+ sequences",
  ):
    out = run_eval(c, workdir, lm=lm, progress=False)
  assert len(out["warnings"]) == 2
  metrics = json.loads((workdir / "report" / "metrics.json").read_text())
  assert metrics["warnings"] == out["warnings"]
  assert "eval set too small for SAE w128-l0.03-s0" in (workdir / "report" / "report.md").read_text()


def _is_png(path: Path) -> bool:
  import matplotlib.image

  return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(path).ndim == 3


def test_local_pipeline_end_to_end(tmp_path):
  """The README's main job on the embedded Gemma 3 270M, with a tiny budget."""
  cmd = [
    sys.executable,
    "-m",
    "scope_jax.cli",
    "run",
    "--config",
    f"{REPO}/configs/local.py:tokens=1500,steps=20,widths=64+128",
    "--workdir",
    str(tmp_path),
    "--config.train.batch_size=256",
    "--config.train.log_every=10",
    "--config.export.batches=2",
    "--config.eval.sequences=4",
    "--config.eval.seq_len=64",
    "--config.eval.batch_size=4",
    "--config.eval.bfloat16=True",
    "--config.eval.domain_sequences=4",
    "--config.eval.quantize_sequences=4",
  ]
  # The workdir is a user's folder, holding files under the names the stages once staged and retired with
  for name in ("export.partial", "browse.tmp", "report.replaced", "export.replaced"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "mine.txt").write_text(name)
  (tmp_path / "notes.md").write_text("a user's notes")
  users = tree_hashes(tmp_path)
  cmd.append("--use_existing_workdir")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")  # as a user's laptop runs it
  first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  while not (tmp_path / "LEASE").exists():  # the same command again, while the first holds the workdir
    assert first.poll() is None, first.communicate()[1][-3000:]
    time.sleep(0.01)
  second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert second.returncode == 1, second.stderr  # refused, not made to wait (it would then have succeeded)
  assert f"scope-jax run: workdir {tmp_path} is in use by another job (host " in second.stderr
  assert f"pid {first.pid}," in second.stderr
  stdout, stderr = first.communicate(timeout=1200)
  done = subprocess.CompletedProcess(cmd, first.returncode, stdout, stderr)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "report in" in done.stdout
  logged = [(r["step"], r["sae"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
  assert len(logged) == len(set(logged)) == 2 * 6  # every line once: the second run wrote nothing
  assert (tmp_path / "activations" / "manifest.json").exists()
  assert (tmp_path / "checkpoints" / "20").exists() and (tmp_path / "metrics.jsonl").exists()
  index = json.loads((tmp_path / "export" / "index.json").read_text())
  assert len(index) == 6 and all(Path(e["gemma_scope"]).exists() and Path(e["saelens"]).exists() for e in index)
  metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
  assert len(metrics["float32"]) == len(metrics["bfloat16"]) == 6
  pngs = list((tmp_path / "report").glob("*.png"))
  assert len(pngs) == 3 + 6 + 1 and all(_is_png(p) for p in pngs)  # + domains.png
  assert "browse: 576 latents of 6 SAEs" in done.stdout  # the feature browser: run's last stage
  assert len(list((tmp_path / "browse" / "w128-l0.001-s0" / "data").glob("*.js"))) == 128
  report = (tmp_path / "report" / "report.md").read_text()  # the local config's domains and formats
  assert "Δ loss docs" in report and "Δ loss code" in report and "| w64-l0.001-s0 | int8 |" in report
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert again.returncode == 0 and "already finished" in again.stdout and "up to date; skipped" in again.stdout
  assert "browse/index.html is up to date; skipped" in again.stdout
  after = tree_hashes(tmp_path)
  assert {k: after.get(k) for k in users} == users  # every file of the user's, as it was
  assert not [p.name for p in tmp_path.iterdir() if ".staging-" in p.name or ".retired-" in p.name]


@pytest.mark.parametrize("kind", ["att", "mlp_in", "mlp", "res"])
def test_a_forward_split_at_a_site_equals_the_spliced_full_forward(lm, tiny_model, kind):
  tokens = eval_batches(eval_config(tiny_model), lm.tokenizer)[0].tokens
  site = f"{kind}.1"
  resid, act, rows = lm.to_site(tokens, site)
  np.testing.assert_allclose(np.asarray(act)[:rows], np.asarray(lm.activations(tokens, [site])[site]), rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(lm.token_losses_from_site(tokens, site, resid, act))[:rows],
    np.asarray(lm.token_losses(tokens)),
    rtol=1e-5,
    atol=1e-6,
  )
  edit = lambda a: a * 0.5 + 0.25
  np.testing.assert_allclose(
    np.asarray(lm.token_losses_from_site(tokens, site, resid, edit(act)))[:rows],
    np.asarray(lm.token_losses(tokens, replace={site: edit})),
    rtol=1e-5,
    atol=1e-6,
  )


def _site_rows(lm, site, batches) -> np.ndarray:
  return np.concatenate([np.asarray(lm.activations(b.tokens, [site])[site])[b.keep] for b in batches])


def _reference_metrics(lm, sae, site, batches, input_site=None):
  """Metrics of one SAE (or a transcoder from `input_site`) the plain way: full forwards with the
  splice, statistics in numpy."""
  ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0}
  rows = _site_rows(lm, site, batches).astype(np.float64)
  inputs = rows if input_site is None else _site_rows(lm, input_site, batches).astype(np.float64)
  mean = rows.mean(0).astype(np.float32)
  splices = {
    "clean": None,
    "spliced": sj.FromSite(input_site, lambda x, a: a.at[:, 1:].set(sae(x)[:, 1:]))
    if input_site
    else lambda a: a.at[:, 1:].set(sae(a)[:, 1:]),
    "zero": lambda a: a.at[:, 1:].set(0),
    "mean": lambda a: a.at[:, 1:].set(mean),
  }
  n, per_seq = 0, {"clean": [], "spliced": [], "n": []}
  for b in batches:
    pred = b.keep[:, 1:]
    n += pred.sum()
    per_seq["n"] += list(pred.sum(1))
    for key, fn in splices.items():
      losses = np.asarray(lm.token_losses(b.tokens, replace={site: fn} if fn else None), np.float64) * pred
      ce[key] += float(np.sum(losses))
      per_seq.get(key, []).extend(losses.sum(1))
  ce = {k: v / n for k, v in ce.items()}
  d_j, n_j = np.subtract(per_seq["spliced"], per_seq["clean"]), np.asarray(per_seq["n"], np.float64)
  d_j, n_j = d_j[n_j > 0], n_j[n_j > 0]
  delta = d_j.sum() / n_j.sum()
  delta_se = np.sqrt(len(n_j) / (len(n_j) - 1) * np.sum((d_j - delta * n_j) ** 2)) / n_j.sum()
  recon = np.asarray(sae(jnp.asarray(inputs, jnp.float32)), np.float64)
  mse = np.mean(np.sum((recon - rows) ** 2, 1))
  return {
    "ce_clean": ce["clean"],
    "ce_spliced": ce["spliced"],
    "ce_zero_ablation": ce["zero"],
    "ce_mean_ablation": ce["mean"],
    "delta_loss": ce["spliced"] - ce["clean"],
    "delta_loss_se": delta_se,
    "loss_recovered_mean": (ce["mean"] - ce["spliced"]) / (ce["mean"] - ce["clean"]),
    "l0": float(np.mean(np.sum(np.asarray(sae.encode(jnp.asarray(inputs, jnp.float32))) > 0, 1))),
    "fvu": mse / np.mean(np.sum((rows - rows.mean(0)) ** 2, 1)),
  }


@contextlib.contextmanager
def compilations():
  """Counts XLA compilations per jitted function name, from JAX's own compile log."""
  counts = collections.Counter()

  class Handler(logging.Handler):
    def emit(self, record):
      if m := re.match(r"Finished XLA compilation of jit\((\w+)\)", record.getMessage()):
        counts[m.group(1)] += 1

  handler, logger = Handler(), logging.getLogger("jax._src.dispatch")
  logger.addHandler(handler)
  with jax.log_compiles(True):
    yield counts
  logger.removeHandler(handler)


def test_the_engine_equals_plain_spliced_forwards_and_compiles_the_model_once_per_site(tiny_model):
  lm = sj.load_model(tiny_model)
  jax.clear_caches()  # programs other tests compiled would not be counted
  c = eval_config(tiny_model, sequences=16, batch_size=8)
  batches = eval_batches(c, lm.tokenizer)
  saes = {
    f"{site}-{width}-{seed}": (fold(init_sae(jax.random.key(seed), 64, width), 3.0 + seed), site)
    for site in ("res.1", "att.2")
    for width in (64, 128)
    for seed in (0, 1)
  }
  with compilations() as compiled:
    results = evaluate_saes(lm, saes, batches, progress=False)
  assert compiled["_to_site"] == 2 and compiled["_losses_from_site"] == 2, compiled  # one per site
  assert compiled["_forward"] == compiled["_losses_forward"] == 0, compiled
  assert compiled["sae_batch"] <= 4, compiled  # one per SAE shape (width, site width)
  for name, (sae, site) in saes.items():
    ref = _reference_metrics(lm, sae, site, batches)
    for key, value in ref.items():
      assert results[name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
  assert results["res.1-64-0"]["ce_mean_ablation"] != results["att.2-64-0"]["ce_mean_ablation"]
  more = {"res.1-again": (fold(init_sae(jax.random.key(9), 64, 128), 2.0), "res.1")}
  with compilations() as compiled:
    evaluate_saes(lm, more, batches, progress=False)
  assert compiled["_to_site"] == compiled["_losses_from_site"] == compiled["sae_batch"] == 0, compiled


@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip_transcoder"])
def test_a_transcoder_spliced_by_the_engine_equals_plain_forwards_reading_its_input_site(lm, tiny_model, skip):
  """The engine splices mlp.1 with the transcoder's prediction from mlp_in.1; the reference does it
  with `FromSite` inside one full forward (itself checked against transformers hooks)."""
  batches = eval_batches(eval_config(tiny_model, sequences=16, batch_size=8), lm.tokenizer)
  rows = _site_rows(lm, "mlp.1", batches)
  tc = fold(init_transcoder(jax.random.key(2), 64, 64, 96, 0.05, jnp.asarray(rows.mean(0)), skip), 2.0, 3.0)
  tc = tc.replace(info=SAEInfo(site="mlp_in.1", target_site="mlp.1"))
  if skip:
    tc = tc.replace(W_skip=tc.W_skip + 0.3 * jax.random.normal(jax.random.key(3), tc.W_skip.shape))
  results = evaluate_saes(lm, {"tc": (tc, "mlp.1")}, batches, progress=False)["tc"]
  ref = _reference_metrics(lm, tc, "mlp.1", batches, input_site="mlp_in.1")
  for key, value in ref.items():
    assert results[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  assert results["l0"] > 1 and abs(results["delta_loss"]) > 1e-3  # the splice changes the loss (a random model)
  with pytest.raises(ValueError, match="input site mlp_in.2 is not of the layer of its target mlp.1"):
    evaluate_saes(lm, {"tc": (tc.replace(info=SAEInfo(site="mlp_in.2", target_site="mlp.1")), "mlp.1")}, batches)


def test_two_runs_started_on_one_workdir_end_as_one_run_alone(tiny_model, tmp_path):
  """The full pipeline on the tiny model: a second `run` on the same workdir is refused at once
  naming the first; what the first leaves equals a run that was alone, file for file."""
  cmd = lambda workdir: [
    sys.executable,
    "-m",
    "scope_jax.cli",
    "run",
    "--config",
    f"{REPO}/configs/local.py:tokens=20000,steps=20,widths=64,l1=0.001+0.01,site=res.1",
    "--workdir",
    str(workdir),
    f"--config.model={tiny_model}",
    "--config.train.batch_size=256",
    "--config.export.batches=2",
    "--config.eval.sequences=4",
    "--config.eval.seq_len=64",
    "--config.eval.batch_size=4",
  ]
  alone = subprocess.run(cmd(tmp_path / "alone"), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert alone.returncode == 0, alone.stderr[-3000:]
  first = subprocess.Popen(cmd(tmp_path / "pair"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  while not (tmp_path / "pair" / "LEASE").exists():
    assert first.poll() is None, first.communicate()[1][-3000:]
    time.sleep(0.01)
  second = subprocess.run(cmd(tmp_path / "pair"), cwd=REPO, capture_output=True, text=True, timeout=300)
  # refused, not made to wait (a waiting job would have run after the first and succeeded); no wall-clock
  # bound, which a loaded machine breaks
  assert second.returncode == 1, second.stderr
  assert "is in use by another job (host " in second.stderr and f"pid {first.pid}," in second.stderr
  assert first.wait(timeout=600) == 0, first.communicate()[1][-3000:]
  alone_files, pair_files = tree_hashes(tmp_path / "alone"), tree_hashes(tmp_path / "pair")
  same = [p for p in alone_files if p.startswith(("activations/shards", "export/gemma-scope", "metrics.jsonl"))]
  assert same and all(alone_files[p] == pair_files[p] for p in same)
  reports = [json.loads((tmp_path / w / "report" / "metrics.json").read_text())["float32"] for w in ("alone", "pair")]
  numbers = lambda report: {n: {k: v for k, v in r.items() if isinstance(v, float)} for n, r in report.items()}
  assert numbers(reports[0]) == numbers(reports[1]) and len(reports[0]) == 2  # (paths differ)


def test_eval_and_browse_refuse_a_users_report_or_browse_folder_before_any_work(lm, tiny_run, tmp_path):
  from scope_jax.browse import run_browse
  from scope_jax.layout import NotOurs

  c, workdir = tiny_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("report", "browse"))
  for name in ("report", "browse"):
    (copy / name).mkdir()
    (copy / name / "draft.md").write_text(f"the user's {name} draft")
  before = tree_hashes(copy)
  with pytest.raises(NotOurs, match=rf"{copy / 'report'} is a folder scope_jax did not make \(it holds draft.md;"):
    run_eval(c, copy, lm=lm, progress=False)
  with pytest.raises(NotOurs, match=rf"{copy / 'browse'} is a folder scope_jax did not make \(it holds draft.md;"):
    run_browse(c, copy, lm=lm, progress=False)
  assert tree_hashes(copy) == before
