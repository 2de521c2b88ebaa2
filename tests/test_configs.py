"""The config files load, with the values their docs promise."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scope_jax.config import problems, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_local_config():
  c = load("local")
  assert c.model == "gemma3-270m" and c.sites == ("res.6",) and c.site == "res.6"
  assert len(c.sweep.widths) >= 2 and len(c.sweep.l1_coefficients) >= 3 and c.data.holdout_every > 0
  assert load("local", "tokens=100,steps=5,widths=64+128").sweep.widths == (64, 128)
  with pytest.raises(ValueError, match="config argument 'stpes'"):
    load("local", "stpes=5")


@pytest.mark.parametrize(
  "size, widths, tokens",
  [
    ("2b", (16_384, 65_536), 8_000_000_000),
    ("9b", (16_384, 131_072), 8_000_000_000),
    ("27b", (131_072,), 8_000_000_000),
  ],
)
def test_gemma2_presets(size, widths, tokens):
  c = load("gemma2", f"size={size},layer=10,kind=mlp")
  assert c.sweep.widths == widths and c.extract.tokens == tokens and c.sites == ("mlp.10",)
  assert c.train.batch_size == 4_096 and c.train.steps * 4_096 == tokens
  assert load("gemma2", f"size={size},widths=16384").extract.tokens == 4_000_000_000


def test_the_clt_and_the_transcoder_suite_share_one_store():
  """configs/transcoder_suite.py's one extraction writes what configs/local.py:kind=clt extracts
  (the same sites in the same order, text, budget and format), so the CLT run can reuse its store
  and the two are compared on the same rows; one transcoder job per layer, one epoch each as the CLT."""
  from scope_jax import grid

  clt, suite = load("local", "kind=clt"), load("transcoder_suite")
  assert (clt.kind, clt.clt.first_layer, clt.clt.last_layer, clt.sweep.widths) == ("clt", 0, 17, (256,))
  jobs = grid.plan(suite, "runs/suite")
  extraction = [j for j in jobs if j.stage == "extract"]
  trainers = [j for j in jobs if j.stage == "train"]
  assert len(extraction) == 1 and len(trainers) == 18
  store = extraction[0].config
  for field in ("sites", "data", "model", "model_dtype", "seed"):
    assert store[field] == clt[field], field
  assert store.extract.to_dict() == clt.extract.to_dict() | {"store": "runs/suite/stores/all-400K"}
  assert all(j.config.kind == "transcoder" and j.config.train.steps == clt.train.steps for j in trainers)
  assert trainers[7].config.site == "mlp_in.7" and trainers[7].config.sweep.widths == clt.sweep.widths


def test_gemma2_preset_bad_arguments():
  with pytest.raises(ValueError, match="size '3b'"):
    load("gemma2", "size=3b")
  with pytest.raises(ValueError, match="layer 30: Gemma 2 2b has layers 0..25"):
    load("gemma2", "size=2b,layer=30")


@pytest.mark.parametrize(
  "name, arg",
  [
    ("local", None),
    ("local", "kind=clt"),
    ("transcoder_suite", None),
    ("gemma2", "size=2b"),
    ("sweep_from_npy", "path=x.npy"),
  ],
)
def test_every_shipped_config_validates(name, arg):
  assert problems(load(name, arg)) == []


@pytest.mark.parametrize(
  "field, value, expected",
  [
    ("train.log_every", 0, "train.log_every = 0: expected an integer >= 1"),
    ("train.checkpoint_every", 0, "train.checkpoint_every = 0: expected an integer >= 1"),
    ("train.batch_size", 0, "train.batch_size = 0: expected an integer >= 1"),
    ("train.steps", 0, "train.steps = 0: expected an integer >= 1"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints = 0: expected an integer >= 1"),
    ("extract.seq_len", 1, "extract.seq_len = 1: expected an integer >= 2"),
    ("extract.tokens", -5, "extract.tokens = -5: expected an integer >= 0"),
    ("export.batches", 0, "export.batches = 0: expected an integer >= 1"),
    ("eval.sequences", 0, "eval.sequences = 0: expected an integer >= 1"),
    ("eval.quantize", ("int4",), "eval.quantize = ('int4',): expected a subset of ('bfloat16', 'float8_e4m3', 'int8')"),
    ("eval.domains", ("builtin:python-docs",), "eval.domains = ('builtin:python-docs',): expected (name, text source)"),
    ("browse.quantiles", (0.5, 1.5), "browse.quantiles = (0.5, 1.5): expected numbers in (0, 1]"),
    ("browse.top_k", 0, "browse.top_k = 0: expected an integer >= 1"),
    ("recipe.lr", -0.002, "recipe.lr = -0.002: expected a number > 0"),
    ("recipe.adam_b2", 1.0, "recipe.adam_b2 = 1.0: expected a number in [0, 1)"),
    ("recipe.normalize", "mean", "recipe.normalize = 'mean': expected one of ('centred', 'raw')"),
    ("recipe.lr_decay_steps", 500, "recipe.lr_decay_steps = 500: expected at most train.steps"),
    ("sweep.widths", (), "sweep.widths = (): expected positive integers"),
    ("sweep.l1_coefficients", (1e-3, -1e-3), "sweep.l1_coefficients = (0.001, -0.001): expected numbers >= 0"),
    ("mesh.data", 0, "mesh.data = 0: expected -1 or an integer >= 1"),
  ],
)
def test_a_field_out_of_range_is_named_with_what_was_expected(field, value, expected):
  c = load("local", "steps=100")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=re.escape(expected)):
    validate(c)


def test_every_bad_field_is_named_at_once():
  c = load("local")
  c.train.log_every, c.recipe.bandwidth = 0, 0.0
  assert problems(c) == [
    "train.log_every = 0: expected an integer >= 1",
    "recipe.bandwidth = 0.0: expected a number > 0",
  ]


def _cli(*overrides):
  args = ["train", "--config", f"{CONFIGS}/local.py", "--workdir", "/nonexistent/never-created", *overrides]
  return subprocess.run([sys.executable, "-m", "scope_jax.cli", *args], capture_output=True, text=True, timeout=300)


def test_the_cli_refuses_a_bad_config_before_doing_anything():
  done = _cli("--config.train.log_every=0", "--config.recipe.lr=-1")
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert "train.log_every = 0: expected an integer >= 1" in done.stderr
  assert "recipe.lr = -1.0: expected a number > 0" in done.stderr
  unknown = _cli("--config.train.stepss=5")
  assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
  assert 'no such config field in --config.train.stepss=5; did you mean "steps"?' in unknown.stderr


def test_sites_must_be_distinct_and_hold_the_site_trained_on():
  c = load("local")
  c.sites = ("res.6", "res.6")
  assert problems(c) == ["sites = ('res.6', 'res.6'): expected each site once (repeated: ['res.6'])"]
  c.sites, c.site = ("res.6", "mlp.6"), "res.7"
  expected = "site = 'res.7': expected one of sites ('res.6', 'mlp.6') (the store holds those), or set data.path"
  assert problems(c) == [expected]
  assert problems(c, "extract") == []  # extraction does not read `site`
  c.data.path = "acts.npy"
  assert problems(c) == []
  c.sites = ("res6",)
  assert problems(c, "extract") == ["sites = ('res6',): expected site names KIND.LAYER, e.g. ('res.6',)"]


def test_the_cli_refuses_duplicated_sites_before_writing_a_store(tmp_path):
  done = subprocess.run(
    [sys.executable, "-m", "scope_jax.cli", "extract", "--config", f"{CONFIGS}/local.py", "--workdir", str(tmp_path)]
    + ["--config.sites=('res.6','res.6')"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert "sites = ('res.6', 'res.6'): expected each site once (repeated: ['res.6'])" in done.stderr
  assert list(tmp_path.iterdir()) == []
