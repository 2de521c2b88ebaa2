"""`scope-jax sweep`: the job table of each Gemma 2 preset, grouping rules, selection, bad grids."""

import json

import pytest

from scope_jax import cli, grid
from scope_jax.config import problems
from tests.test_configs import load


@pytest.mark.parametrize(
  "size, n_extract, n_train, n_saes",
  [
    # 26 layers × {res, mlp, att}; res.5/12/19 train 2^14..2^20 (1M needs 16B tokens), the rest
    # 16.4K (4B) and 65.5K (8B). Stores: one per layer at 8B (23 layers) plus, at layers 5/12/19,
    # res alone at 16B and mlp+att(+mlp_in) at 8B (6). Trainer jobs: 75 sites × 2 budgets + 3 sites
    # × 3 budgets (4B: 16K; 8B: 32K..512K; 16B: 1M) + 26 transcoders (16K, 4B). SAEs: (75 × 2 +
    # 3 × 7 + 26) widths × 5 λ.
    ("2b", 23 + 6, 75 * 2 + 3 * 3 + 26, (75 * 2 + 3 * 7 + 26) * 5),
    # 42 layers, wide res layers 9/20/31, 16.4K and 131K elsewhere
    ("9b", 39 + 6, 123 * 2 + 3 * 3, (123 * 2 + 3 * 7) * 5),
    # res at layers 10, 22, 34; 131K at 8B tokens
    ("27b", 3, 3, 3 * 5),
  ],
)
def test_preset_dry_run_prints_the_release_job_table(size, n_extract, n_train, n_saes, capsys, tmp_path):
  cli.main(["sweep", "--config", f"configs/gemma2.py:size={size}", "--workdir", str(tmp_path), "--dry_run"])
  out = capsys.readouterr().out.splitlines()
  assert out[-1] == f"{n_extract} extraction jobs, {n_train} trainer jobs, {n_saes} SAEs"
  assert len(out) == 1 + n_extract + n_train + 1  # header, jobs, totals
  assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_runlocal_preset_is_one_store_and_one_trainer_job_per_site(tmp_path):
  planned = grid.plan(load("gemma2", "size=9b,layer=3,runlocal"), tmp_path)
  assert [j.name for j in planned] == ["extract/L3-51.2K", "train/res.3-51.2K", "train/mlp.3-51.2K"]
  assert planned[0].config.sites == ("res.3", "mlp.3")
  train = planned[1].config
  assert train.site == "res.3" and train.sweep.widths == (1024, 2048) and train.train.steps == 100
  assert train.extract.store == planned[0].workdir == f"{tmp_path}/stores/L3-51.2K"


def test_the_2b_transcoder_suite_reads_each_layer_s_pair_from_one_store():
  c = load("gemma2", "size=2b")
  c.grid.layers, c.grid.site_widths = (3,), ()
  planned = {j.name: j for j in grid.plan(c, "runs")}
  tc = planned["train/transcoder.3-4B"]
  assert (tc.config.kind, tc.config.site, tc.config.target_site) == ("transcoder", "mlp_in.3", "mlp.3")
  assert tc.widths == (16_384,) and tc.config.train.steps == 4_000_000_000 // 4_096
  # the pair takes the larger budget of mlp.3 (65.5K SAEs: 8B) and lands in its store
  store = planned["extract/L3-8B"]
  assert set(store.config.sites) == {"res.3", "mlp.3", "att.3", "mlp_in.3"}
  assert tc.config.extract.store == store.workdir and not problems(tc.config, "train")
  c.grid.extract_by = "site"
  by_site = {j.name: j for j in grid.plan(c, "runs")}
  assert by_site["extract/mlp.3-8B"].config.sites == ("mlp.3", "mlp_in.3")
  assert by_site["train/transcoder.3-4B"].config.extract.store == by_site["extract/mlp.3-8B"].workdir
  c.grid.kinds, c.grid.transcoders = ("res",), ("transcoder", "skip_transcoder")
  alone = {j.name: j for j in grid.plan(c, "runs")}  # no mlp SAEs: the pair's own store, at 4B
  assert alone["extract/mlp.3-4B"].config.sites == ("mlp_in.3", "mlp.3")
  assert alone["train/skip_transcoder.3-4B"].config.kind == "skip_transcoder"


def test_grouping_by_site_and_all_and_store_root():
  c = load("gemma2", "size=2b")
  c.grid.layers, c.grid.site_widths = (3, 4), ()
  c.extract.store = "gs://bucket/acts/"
  by_site = [j for j in grid.plan(c, "runs") if j.stage == "extract"]
  c.grid.extract_by = "site"
  assert len([j for j in grid.plan(c, "runs") if j.stage == "extract"]) == 6 and len(by_site) == 2
  c.grid.extract_by = "all"
  (everything,) = [j for j in grid.plan(c, "runs") if j.stage == "extract"]
  assert len(everything.sites) == 8 and everything.workdir == "gs://bucket/acts/all-8B"  # with mlp_in.3, mlp_in.4


def test_select_by_pattern():
  planned = grid.plan(load("gemma2", "size=2b"), "runs")
  chosen = grid.select(planned, "train/res.12-*,extract/L12-*")
  assert [j.name for j in chosen] == [
    "extract/L12-16B",
    "extract/L12-8B",
    "train/res.12-4B",
    "train/res.12-8B",
    "train/res.12-16B",
  ]
  with pytest.raises(ValueError, match="--jobs 'train/res.99' matches none of the 214 jobs"):
    grid.select(planned, "train/res.99")


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("grid.layers", (), "config.grid.layers is empty"),
    ("grid.kinds", ("resid",), r"config.grid.kinds \['resid'\]: expected a subset of"),
    ("grid.extract_by", "model", "config.grid.extract_by 'model': expected one of"),
    ("grid.site_widths", (("res.99", (1024,)),), "names res.99, which is not in the grid"),
    ("sweep.l1_coefficients", (), "config.sweep.l1_coefficients is empty"),
    ("grid.transcoders", ("crosscoder",), r"config.grid.transcoders \['crosscoder'\]: expected a subset of"),
  ],
)
def test_bad_grids_are_clear_errors(field, value, message):
  c = load("gemma2", "size=2b")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=message):
    grid.plan(c, "runs")


def test_a_grid_of_transcoders_only_plans_no_sae_jobs_but_a_grid_of_nothing_is_refused():
  c = load("gemma2", "size=2b")
  c.grid.kinds, c.grid.site_widths = (), ()
  jobs = grid.plan(c, "runs")
  assert {j.config.kind for j in jobs if j.stage == "train"} == {"transcoder"}
  c.grid.transcoders = ()
  with pytest.raises(ValueError, match=r"config.grid.kinds \[\]: expected .* non-empty unless the grid trains"):
    grid.plan(c, "runs")


def test_a_sweep_runs_every_job_then_finds_them_finished(tiny_model, tmp_path, capsys):
  """The runlocal grid on a tiny model: one extraction job (whose workdir is its store, held
  once by the sweep) and two trainer jobs; the second sweep runs nothing and no lease is left."""
  args = ["sweep", "--config", f"configs/gemma2.py:size=2b,runlocal,layer=1,model={tiny_model}"]
  args.append("--config.extract.tokens=20480")  # what is tested is the jobs, not the SAEs: 40 steps each
  cli.main([*args, "--workdir", str(tmp_path)])
  out = capsys.readouterr().out
  assert out.count("eval: report in") == 3
  for site in ("res.1", "mlp.1"):
    assert len(json.loads((tmp_path / "train" / f"{site}-20.48K" / "export" / "index.json").read_text())) == 4
  index = json.loads((tmp_path / "train" / "transcoder.1-20.48K" / "export" / "index.json").read_text())
  assert len(index) == 2 and {(e["kind"], e["site"], e["target_site"]) for e in index} == {
    ("transcoder", "mlp_in.1", "mlp.1")
  }
  cli.main([*args, "--workdir", str(tmp_path)])
  assert capsys.readouterr().out.count("finished earlier; skipped") == 4
  assert not list(tmp_path.rglob("LEASE"))
