"""The feature browser (`scope-jax browse`, and the last stage of `scope-jax run`): a static site
under WORKDIR/browse that opens from the file system (no server).

    browse/index.html            every SAE of the run, linked
    browse/SAE/index.html        every latent: density, max activation, top token, promoted tokens;
                                 search by id, sort by any number column (rows from latents.js)
    browse/SAE/latent.html?i=ID  one latent, drawn from data/ID.js (loaded on demand, so a 16K-wide
                                 SAE is 16K small files, not one page nobody can open)
    browse/SAE/neuronpedia/batch-K.json   the same data as Neuronpedia dashboard batches

A latent's record is a Neuronpedia dashboard feature (the schema of SAEDashboard's
`sae_dashboard/neuronpedia/neuronpedia_dashboard.py`, `NeuronpediaDashboardFeature`: `pos_str` /
`pos_values`, `neg_str` / `neg_values`, `frac_nonzero`, `freq_hist_data_bar_*`, `activations` as
groups of token strings and values with `bin_min` / `bin_max` / `bin_contains`, top activations
marked `bin_min = -1` as its converter does) plus a `scope` entry with what the page needs beside
it (store rows, the highlighted column, histogram edges). The batch files drop `scope`.

Contexts: the `browse.top_k` largest activations of each latent and `browse.samples` rows drawn
at random from the histogram bin holding each of `browse.quantiles` of its activations; each is
the window of `browse.before` tokens before and `browse.after` after, inside its document, with
the latent's activation on every token (process 0 reads them; every process scans its share of
the store's chunks for the statistics, `features.scan`). Promoted / suppressed tokens: the decoder direction
through the model's unembedding (final norm scale folded in), for SAEs writing the residual
stream (`res`, `mlp` sites and transcoders). Splitting: each latent links to its children in the
next wider SAE of the same site and λ (`analysis/matching.py` `children`: nearest decoder directions), each
with the share of the child's firings on which the parent fires too (co-activation, counted in
the same scan).
"""

from __future__ import annotations

import html
import json
import re
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from scope_jax.activations.store import Store, open_store
from scope_jax.analysis.matching import children
from scope_jax.browse.contexts import TokenText, check_trace, windows
from scope_jax.browse.features import N_BINS, LatentStats, bin_edges, scan
from scope_jax.eval.evaluate import entry_sae, saes_to_evaluate
from scope_jax.layout import RunLayout, check_replaceable, discard, export_identity, new_staging, replace_directory
from scope_jax.models.sites import parse_site
from scope_jax.parallel.precision import traced_at
from scope_jax.sae import SAE

RESIDUAL_KINDS = ("res", "mlp")  # sites whose decoder directions live in the residual stream
BATCH_FEATURES = 256  # features per Neuronpedia batch file


def browse_identity(config: ml_collections.ConfigDict, layout: RunLayout) -> dict:
  """What a browser is made from: the export and the browse fields."""
  return {"export": export_identity(config, layout), "browse": config.browse.to_dict()}


def run_browse(config: ml_collections.ConfigDict, workdir: str | Path, lm=None, progress: bool = True) -> dict:
  """Writes the browser of every exported SAE (and `eval.saes`) over the run's store; returns
  {"index": path, "saes": {name: latents}}."""
  from scope_jax.activations.extract import load_extraction_model, store_root

  layout = RunLayout(workdir)
  if jax.process_index() == 0:
    check_replaceable(layout.browse)  # a browse/ scope_jax did not make is refused before the scan
  entries = {name: e for name, e in saes_to_evaluate(config, workdir).items() if not e.prefix}
  store = open_store(config.data.path or store_root(config, workdir))
  check_trace(store)
  for name, e in entries.items():
    if e.input_site not in store.sites:
      raise ValueError(
        f"SAE {name} reads site {e.input_site}, which the store {store.root} does not hold "
        f"(it holds {list(store.sites)}); browse it with --config.data.path set to a store of that site"
      )
  writer = jax.process_index() == 0  # every process scans its chunks; process 0 writes the site
  lm = lm or load_extraction_model(config)
  text = TokenText(lm.tokenizer)
  unembed_vd = (
    lm.unembedding() if any(parse_site(e.output_site).kind in RESIDUAL_KINDS for e in entries.values()) else None
  )
  staging = None  # the site is written whole here (process 0), then swapped in
  if writer:
    layout.unmark("browse")
    staging = new_staging(layout.browse, "browse")
    (staging / "assets").mkdir()
    for asset in ("style.css", "index.js", "latent.js"):
      text_of = resources.files("scope_jax.browse").joinpath("assets", asset).read_text()
      (staging / "assets" / asset).write_text(text_of)
  try:
    with traced_at(config.precision):
      written = write_sites(config, entries, store, text, unembed_vd, staging, progress)
    if writer:
      (staging / "index.html").write_text(_top_index(entries, written, config))
  except BaseException:
    if staging is not None:
      discard(staging)
    raise
  if writer:
    replace_directory(staging, layout.browse)  # a browse/ scope_jax did not make is refused, staging discarded
    layout.mark_finished("browse", browse_identity(config, layout))
  multihost_utils.sync_global_devices("scope_jax browse: site written")
  return {"index": layout.browse / "index.html", "saes": written}


def write_sites(config, entries: dict, store: Store, text: TokenText, unembed_vd, staging: Path | None, progress: bool):
  """Scans the store for every SAE of `entries`, site by site, and (process 0, `staging` given)
  writes each SAE's folder of the site; returns {name: latents}."""
  writer = staging is not None
  written = {}
  for site in sorted({e.input_site for e in entries.values()}):
    saes = {name: entry_sae(e) for name, e in entries.items() if e.input_site == site}
    b = config.browse
    trees = {}  # name -> (the next wider SAE, each latent's children in it)
    for name, sae in saes.items():
      if wider := next_wider(name, entries):
        trees[name] = (wider, children(sae, saes[wider], min_cosine=b.split_cosine))
    pairs = {
      (name, wider): np.asarray([(p, c) for p, kids in enumerate(tree) for c, _ in kids], np.int64).reshape(-1, 2)
      for name, (wider, tree) in trees.items()
    }
    stats = scan(store, site, saes, b.top_k, b.samples, b.rows, b.chunk_rows, config.seed, progress and writer, pairs)
    for name, sae in saes.items():
      written[name] = sae.width
      if not writer:
        continue
      residual = parse_site(entries[name].output_site).kind in RESIDUAL_KINDS
      logits = promoted_tokens(sae, unembed_vd, b.logit_tokens) if residual else None
      records = latent_records(name, sae, stats[name], store, site, text, logits, config)
      if name in trees:  # each child: (latent, decoder cosine, share of its firings the parent's fire with)
        wider, tree = trees[name]
        both = dict(zip(map(tuple, pairs[name, wider].tolist()), stats[name].co_fires[wider].tolist()))
        fires = stats[wider].fires_m
        for p, (rec, kids) in enumerate(zip(records, tree)):
          kids = [(c, cos, both[p, c] / max(int(fires[c]), 1)) for c, cos in kids]
          rec["scope"] |= {"children": kids, "children_sae": folder_of(wider)}
      write_sae(staging / folder_of(name), records, config, name, entries[name], progress)
  return written


def folder_of(name: str) -> str:
  """An SAE's folder under browse/: its name, or (an `eval.saes` path) the path made one safe name."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "sae"


def next_wider(name: str, entries: dict) -> str | None:
  """The SAE a latent of `name` splits into: the next wider one of the same sites and λ (or k)."""
  e = entries[name]
  key = lambda o: (o.output_site, o.input_site, o.l1_coefficient, o.k)
  same = [(o.width, n) for n, o in entries.items() if key(o) == key(e) and o.width > e.width]
  return min(same)[1] if same else None


def promoted_tokens(sae: SAE, unembed_vd: jax.Array, k: int) -> tuple[np.ndarray, ...]:
  """(top ids [M, k], top logits, bottom ids, bottom logits) of each decoder row through the
  unembedding, in blocks of latents (the [block, V] logits are the only large temporary)."""
  out = [[], [], [], []]
  w_dec_md = jnp.asarray(sae.W_dec, jnp.float32)
  for s in range(0, w_dec_md.shape[0], 256):
    top_v, top_i, bot_v, bot_i = _extremes(w_dec_md[s : s + 256], unembed_vd, k)
    for o, v in zip(out, (top_i, top_v, bot_i, bot_v)):
      o.append(np.asarray(v))
  return tuple(np.concatenate(o) for o in out)


@jax.jit(static_argnums=2)
def _extremes(dirs_nd, unembed_vd, k):
  logits_nv = dirs_nd @ unembed_vd.T
  top_v, top_i = jax.lax.top_k(logits_nv, k)
  bot_v, bot_i = jax.lax.top_k(-logits_nv, k)
  return top_v, top_i, -bot_v, bot_i


def _quantile_bins(stats: LatentStats, quantiles) -> list[tuple[int, int, float]]:
  """(latent, bin, quantile): the histogram bin holding each quantile of each firing latent."""
  cum_mb = np.cumsum(stats.hist_mb, axis=1)
  out = []
  for q in quantiles:
    bins = np.argmax(cum_mb >= q * np.maximum(stats.fires_m, 1)[:, None], axis=1)
    out += [(int(m), int(bins[m]), float(q)) for m in np.flatnonzero(stats.fires_m)]
  return sorted(set(out), key=lambda t: (t[0], t[2]))


def latent_records(name, sae, stats: LatentStats, store: Store, site, text: TokenText, logits, config) -> list[dict]:
  """One Neuronpedia-style feature record per latent (module docstring)."""
  b = config.browse
  edges = bin_edges()
  quantile_of = {}  # sample group (latent * N_BINS + bin) -> the first quantile that bin holds
  for m, bin_, q in _quantile_bins(stats, b.quantiles):
    quantile_of.setdefault(m * N_BINS + bin_, q)
  pick = np.isin(stats.samples.group, np.asarray(list(quantile_of), np.int64))
  sample_groups = stats.samples.group[pick]
  rows_n = np.concatenate([stats.top.row, stats.samples.row[pick]])
  latent_n = np.concatenate([stats.top.group, sample_groups // N_BINS])
  headers = [{"bin_min": -1, "bin_max": float(v), "bin_contains": -1} for v in stats.top.value]
  quantiles = [None] * len(stats.top.row)
  for g in sample_groups:
    m, bin_ = divmod(int(g), N_BINS)
    share = float(stats.hist_mb[m, bin_] / max(int(stats.fires_m[m]), 1))
    headers.append({"bin_min": float(edges[bin_]), "bin_max": float(edges[bin_ + 1]), "bin_contains": share})
    quantiles.append(quantile_of[int(g)])
  w = windows(store, site, sae, rows_n, latent_n, b.before, b.after)
  per_latent: dict[int, list] = {m: [] for m in range(sae.width)}
  for i in range(len(rows_n)):
    tokens, center = _context(text, w.tokens_nw[i], w.values_nw[i], w.center)
    per_latent[int(latent_n[i])].append((headers[i] | tokens, int(rows_n[i]), center, quantiles[i]))
  max_m = stats.max_m()
  records = []
  for m in range(sae.width):
    lo, hi = _hist_span(stats.hist_mb[m])
    contexts = per_latent[m]
    rec = {
      "feature_index": m,
      "pos_str": [],
      "pos_values": [],
      "neg_str": [],
      "neg_values": [],
      "frac_nonzero": float(stats.density_m[m]),
      "freq_hist_data_bar_values": [float(f"{v:.6g}") for v in edges[lo:hi]],
      "freq_hist_data_bar_heights": [int(v) for v in stats.hist_mb[m, lo:hi]],
      "n_prompts_total": int(stats.rows),
      "n_tokens_in_prompt": b.before + 1 + b.after,
      "dataset": ",".join(store.text),
      "activations": [c[0] for c in contexts],
      "scope": {
        "sae": name,
        "latent": m,
        "fires": int(stats.fires_m[m]),
        "rows": int(stats.rows),
        "max": float(max_m[m]),
        "hist_edges": [float(f"{v:.6g}") for v in edges[lo : hi + 1]],
        "context_rows": [c[1] for c in contexts],
        "centers": [c[2] for c in contexts],
        "quantiles": [c[3] for c in contexts],
      },
    }
    if logits is not None:
      top_i, top_v, bot_i, bot_v = (x[m] for x in logits)
      rec |= {
        "pos_str": [text.pieces[int(i)] for i in top_i],
        "pos_values": [float(f"{v:.4g}") for v in top_v],
        "neg_str": [text.pieces[int(i)] for i in bot_i],
        "neg_values": [float(f"{v:.4g}") for v in bot_v],
      }
    records.append(rec)
  return records


def _hist_span(counts: np.ndarray) -> tuple[int, int]:
  nz = np.flatnonzero(counts)
  return (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)


def _context(text: TokenText, tokens_w: np.ndarray, values_w: np.ndarray, center: int) -> tuple[dict, int]:
  """({"tokens", "values"} of the document's part of the window, the center's index in it)."""
  keep = np.flatnonzero(tokens_w >= 0)
  return (
    {"tokens": text.strings(tokens_w[keep]), "values": [float(f"{v:.4g}") for v in values_w[keep]]},
    int(np.searchsorted(keep, center)),
  )


def neuronpedia_feature(record: dict) -> dict:
  """The record as SAEDashboard's `NeuronpediaDashboardFeature(**feature)` takes it."""
  out = {k: v for k, v in record.items() if k != "scope"}
  for key in (
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "decoder_weights_dist",
  ):
    out[key] = []
  return out


def write_sae(folder: Path, records: list[dict], config, name: str, entry: dict, progress: bool) -> None:
  (folder / "data").mkdir(parents=True)
  (folder / "neuronpedia").mkdir()
  rows = []
  for rec in tqdm(records, desc=f"browse: write {name}", unit="latent", disable=not progress):
    m = rec["feature_index"]
    (folder / "data" / f"{m}.js").write_text("scopeLatent(" + json.dumps(rec, separators=(",", ":")) + ");\n")
    top = rec["activations"][0] if rec["activations"] else None
    top_token = top["tokens"][rec["scope"]["centers"][0]] if top else ""
    rows.append([m, rec["frac_nonzero"], rec["scope"]["max"], top_token, rec["pos_str"][:3]])
  (folder / "latents.js").write_text("scopeLatents(" + json.dumps(rows, separators=(",", ":")) + ");\n")
  layer = parse_site(entry.output_site).layer
  for k in range(0, len(records), BATCH_FEATURES):
    batch = {
      "model_id": str(config.model),
      "layer": layer,
      "sae_set": name,
      "features": [neuronpedia_feature(r) for r in records[k : k + BATCH_FEATURES]],
    }
    (folder / "neuronpedia" / f"batch-{k // BATCH_FEATURES}.json").write_text(json.dumps(batch))
  title = html.escape(
    f"{name} ({entry.input_site}" + (f" -> {entry.output_site}" if entry.output_site != entry.input_site else "") + ")"
  )
  (folder / "index.html").write_text(
    _PAGE.format(
      title=title,
      body=_SAE_INDEX.format(title=title, width=len(records)),
      script="index.js",
      data='<script src="latents.js"></script>',
    )
  )
  (folder / "latent.html").write_text(
    _PAGE.format(
      title=title, body='<p><a href="index.html">all latents</a></p><div id="main"></div>', script="latent.js", data=""
    )
  )


def _top_index(entries: dict, written: dict, config) -> str:
  items = "".join(
    f'<li><a href="{html.escape(folder_of(n))}/index.html">{html.escape(n)}</a> '
    f'<span class="muted">{html.escape(entries[n].output_site)}, {written[n]:,} latents</span></li>'
    for n in written
  )
  title = html.escape(f"scope_jax feature browser: {config.model}")
  return _PAGE.format(title=title, body=f"<h1>{title}</h1><ul id='saes'>{items}</ul>", script="", data="").replace(
    "../assets/", "assets/"
  )


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="../assets/style.css">
<script src="../assets/{script}"></script>{data}
</head><body>{body}</body></html>
"""

_SAE_INDEX = """<p><a href="../index.html">all SAEs</a></p><h1>{title}</h1>
<p><input id="search" placeholder="latent id" autofocus> <span id="count" class="muted"></span>
(Enter opens the latent; click a column to sort)</p>
<table><thead><tr><th class="sortable" data-key="0">latent</th><th class="sortable" data-key="1">density</th>
<th class="sortable" data-key="2">max activation</th><th>top token</th><th>promotes</th></tr></thead>
<tbody id="latents"></tbody></table>
"""
