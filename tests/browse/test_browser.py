"""The feature browser of a real (tiny-budget) local run on the embedded Gemma 3 270M, opened in
headless Chromium through Selenium, and its Neuronpedia batches read by SAEDashboard's own class."""

import dataclasses
import json
import shutil
import struct

import jax
import numpy as np
import pytest

import scope_jax as sj
from scope_jax.activations.extract import extract
from scope_jax.activations.store import TRACE_COLUMNS, open_store
from scope_jax.browse import run_browse
from scope_jax.export.exporter import export
from scope_jax.train import train
from tests.test_configs import load

SEQ, COL, DOC, TOKEN = (TRACE_COLUMNS.index(c) for c in ("seq", "col", "doc", "token"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """extract -> train -> export -> browse, the local config at a tiny budget."""
  workdir = tmp_path_factory.mktemp("local")
  c = load("local", "tokens=4000,steps=30,widths=64+128,l1=1e-3")
  c.train.batch_size, c.train.log_every, c.export.batches = 128, 10, 2
  c.browse.top_k, c.browse.before, c.browse.after = 6, 8, 3
  c.browse.split_cosine = 0.0  # 30 steps leave the two widths' directions near their random inits
  lm = sj.load_model("gemma3-270m", mesh=sj.make_mesh(devices=jax.devices()[:1]))
  extract(c, workdir, lm=lm, progress=False)
  train(c, workdir, progress=False)
  export(c, workdir, progress=False)
  out = run_browse(c, workdir, lm=lm, progress=False)
  return c, workdir, out, lm


def _driver():
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  driver_path = shutil.which("chromedriver")
  if not (chromium and driver_path):
    pytest.skip("no Chromium here: `apt-get install chromium chromium-driver` (.ci/run installs them)")
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
    options.add_argument(arg)
  return webdriver.Chrome(service=Service(driver_path), options=options)


def _window_text(store, row: int, before: int, after: int, tokenizer) -> str:
  """Brute force over the whole (small) trace: the tokens of `row`'s sequence and document within
  the window, contiguous around it, decoded by the tokenizer."""
  trace = store.read("trace", 0, store.rows).astype(np.int64)
  seq, col, doc = trace[row, SEQ], trace[row, COL], trace[row, DOC]
  by_col = {int(t[COL]): t for t in trace[(trace[:, SEQ] == seq) & (trace[:, DOC] == doc)]}
  ids = [int(by_col[col][TOKEN])]
  for step, n in ((-1, before), (1, after)):
    for k in range(1, n + 1):
      t = by_col.get(int(col + step * k))
      if t is None:
        break
      ids = [int(t[TOKEN]), *ids] if step < 0 else [*ids, int(t[TOKEN])]
  return tokenizer.decode(ids)


def _png_size(path) -> tuple[int, int]:
  head = path.read_bytes()[:24]
  assert head[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", head[16:24])


def test_the_browser_opens_lists_every_latent_searches_and_shows_the_stored_text(run, tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support import expected_conditions as ec
  from selenium.webdriver.support.ui import WebDriverWait

  c, workdir, out, lm = run
  assert out["saes"] == {"w64-l0.001-s0": 64, "w128-l0.001-s0": 128}
  store = open_store(str(workdir / "activations"))
  driver = _driver()
  try:
    driver.get((workdir / "browse" / "index.html").as_uri())
    links = driver.find_elements(By.CSS_SELECTOR, "#saes a")
    assert sorted(a.text for a in links) == sorted(out["saes"])
    next(a for a in links if a.text == "w128-l0.001-s0").click()
    WebDriverWait(driver, 10).until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr.latent")))
    ids = sorted(int(tr.get_attribute("data-latent")) for tr in driver.find_elements(By.CSS_SELECTOR, "tr.latent"))
    assert ids == list(range(128))  # every latent listed
    density = [float(td.text.rstrip("%")) for td in driver.find_elements(By.CSS_SELECTOR, "tr.latent td:nth-child(2)")]
    driver.find_element(By.CSS_SELECTOR, "th[data-key='1']").click()  # sort by density, largest first
    by_density = [
      float(td.text.rstrip("%")) for td in driver.find_elements(By.CSS_SELECTOR, "tr.latent td:nth-child(2)")
    ]
    assert by_density == sorted(density, reverse=True)

    records = {m: _record(workdir, "w128-l0.001-s0", m) for m in range(128)}
    latent = max(records, key=lambda m: records[m]["frac_nonzero"])  # one with contexts to show
    search = driver.find_element(By.ID, "search")
    search.send_keys(str(latent))
    shown = driver.find_elements(By.CSS_SELECTOR, "tr.latent")
    assert [int(tr.get_attribute("data-latent")) for tr in shown] == [latent]  # search finds it
    search.send_keys(Keys.ENTER)
    WebDriverWait(driver, 10).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#top .ctx")))
    assert driver.current_url.endswith(f"latent.html?i={latent}")
    contexts = driver.find_elements(By.CSS_SELECTOR, "#top .ctx")
    scope = records[latent]["scope"]
    assert len(contexts) == min(c.browse.top_k, scope["fires"])
    for j, ctx in enumerate(contexts):
      text = "".join(span.get_attribute("textContent") for span in ctx.find_elements(By.CSS_SELECTOR, ".tok"))
      assert text == _window_text(store, scope["context_rows"][j], c.browse.before, c.browse.after, lm.tokenizer)
      assert ctx.find_elements(By.CSS_SELECTOR, ".tok.center"), "the active token is highlighted"
    assert driver.find_elements(By.CSS_SELECTOR, "#hist rect") and driver.find_elements(By.CSS_SELECTOR, ".tokens span")
    shot = tmp_path / "latent.png"
    assert driver.save_screenshot(str(shot))
    width, height = _png_size(shot)
    assert width >= 800 and height >= 600 and shot.stat().st_size > 20_000
    # splitting: a latent of the 64-wide SAE links to its children in the 128-wide one
    parent = next(m for m in range(64) if _record(workdir, "w64-l0.001-s0", m)["scope"]["children"])
    child = _record(workdir, "w64-l0.001-s0", parent)["scope"]["children"][0][0]
    driver.get((workdir / "browse" / "w64-l0.001-s0" / "latent.html").as_uri() + f"?i={parent}")
    WebDriverWait(driver, 10).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#children a")))
    driver.find_element(By.CSS_SELECTOR, "#children a").click()
    WebDriverWait(driver, 10).until(ec.url_contains(f"w128-l0.001-s0/latent.html?i={child}"))
    driver.get((workdir / "browse" / "w128-l0.001-s0" / "latent.html").as_uri() + "?i=999")
    WebDriverWait(driver, 10).until(ec.text_to_be_present_in_element((By.ID, "main"), "not in this SAE"))
  finally:
    driver.quit()


def _record(workdir, sae: str, m: int) -> dict:
  text = (workdir / "browse" / sae / "data" / f"{m}.js").read_text()
  assert text.startswith("scopeLatent(") and text.endswith(");\n")
  return json.loads(text[len("scopeLatent(") : -3])


def test_the_neuronpedia_batches_load_in_saedashboard_s_own_class(run):
  dashboard = pytest.importorskip(
    "sae_dashboard.neuronpedia.neuronpedia_dashboard", reason="pip install --no-deps sae-dashboard (.ci/run does)"
  )
  _, workdir, _, _ = run
  files = sorted((workdir / "browse" / "w64-l0.001-s0" / "neuronpedia").glob("batch-*.json"))
  assert len(files) == 1
  batch = json.loads(files[0].read_text())
  loaded = dashboard.NeuronpediaDashboardBatch(**batch)
  assert _within(batch, json.loads(json.dumps(loaded.to_dict())))  # nothing of ours lost or renamed
  assert [f.feature_index for f in loaded.features] == list(range(64)) and batch["layer"] == 6
  record = _record(workdir, "w64-l0.001-s0", 3)
  assert {k: v for k, v in record.items() if k != "scope"}.items() <= batch["features"][3].items()


def _within(ours, theirs) -> bool:
  """Every key and value of `ours` is in `theirs` (which may add its own defaults)."""
  if isinstance(ours, dict):
    return isinstance(theirs, dict) and all(k in theirs and _within(v, theirs[k]) for k, v in ours.items())
  if isinstance(ours, list):
    return isinstance(theirs, list) and len(ours) == len(theirs) and all(map(_within, ours, theirs))
  return ours == theirs


def test_bad_input_is_a_clear_error(run, tmp_path):
  c, workdir, _, lm = run
  other = c.copy_and_resolve_references()
  other.eval.saes = (str(workdir / "export" / "saelens" / "res.6-w64-l0.001-s0"),)
  sae_dir = tmp_path / "mlp_sae"
  sae = sj.load_sae(other.eval.saes[0])
  sj.save_sae(sae.replace(info=dataclasses.replace(sae.info, site="mlp.3")), sae_dir, format="saelens")
  other.eval.saes = (str(sae_dir),)
  with pytest.raises(ValueError, match=r"reads site mlp.3, which the store .* does not hold \(it holds \['res.6'\]\)"):
    run_browse(other, workdir, lm=lm, progress=False)
  manifest = json.loads((workdir / "activations" / "manifest.json").read_text())
  no_trace = tmp_path / "no_trace"
  shutil.copytree(workdir / "activations", no_trace)
  (no_trace / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "trace_columns"}))
  other = c.copy_and_resolve_references()
  other.data.path = str(no_trace)
  with pytest.raises(ValueError, match="the store has no trace columns"):
    run_browse(other, workdir, lm=lm, progress=False)
