"""`scope-jax eval`: every SAE of a run (and any SAE `load_sae` reads) on held-out text.

For each SAE: L0, MSE, FVU, latent densities (eval/metrics.py), and the next-token loss with
its reconstruction spliced in at its site (`lm.token_losses(..., replace=...)`), beside the
clean loss and the loss with the site zero-ablated:

    delta loss       = CE(spliced) - CE(clean)
    loss recovered   = (CE(zero) - CE(spliced)) / (CE(zero) - CE(clean))

Special tokens are masked throughout: SAE statistics use only positions holding text tokens,
the loss only predictions of text tokens, and splices leave BOS (position 0) untouched.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from scope_jax.activations.sequences import batches, sequences
from scope_jax.data.text import iter_documents
from scope_jax.eval.metrics import SAEStats
from scope_jax.models.sites import parse_site, site_width
from scope_jax.parallel.mesh import host_array
from scope_jax.sae.io import load_sae
from scope_jax.sae.model import SAE


class OverlapError(ValueError):
  """The evaluation text is (or may be) part of the training text."""


def eval_documents(config: ml_collections.ConfigDict):
  """`eval.text` if given, else the documents extraction held out (id % holdout_every == 0)."""
  if config.eval.text:
    yield from iter_documents(list(config.eval.text), config.data.text_field)
    return
  every = config.data.holdout_every
  if not every:
    message = ("the evaluation text is the training text: data.holdout_every is 0 and eval.text is empty; "
               "set data.holdout_every (documents kept out of extraction) or eval.text")
    if config.eval.strict:
      raise OverlapError(message)
    warnings.warn(message, stacklevel=2)
  for doc_id, text in iter_documents(list(config.data.text), config.data.text_field):
    if not every or doc_id % every == 0:
      yield doc_id, text


def eval_batches(config: ml_collections.ConfigDict, tokenizer) -> list:
  e = config.eval
  out = list(batches(sequences(eval_documents(config), tokenizer, e.seq_len, "pack"), e.batch_size,
                     tokenizer.pad_id, max_batches=-(-e.sequences // e.batch_size)))
  if not out:
    raise ValueError("no evaluation text: the held-out documents (or eval.text) are empty")
  return out


def _splice(sae: SAE):
  """Replaces a site's activation by the SAE's reconstruction at every position but BOS."""
  def fn(act_btd):
    recon = sae(act_btd.astype(sae.W_enc.dtype)).astype(act_btd.dtype)
    return act_btd.at[:, 1:].set(recon[:, 1:])
  return fn


def _zero(act_btd):
  return act_btd.at[:, 1:].set(0)


def check_sae(sae: SAE, site: str, lm, name: str) -> None:
  s = parse_site(site, lm.config)
  width = site_width(s, lm.config)
  if sae.d_in != width:
    raise ValueError(f"SAE {name}: input width {sae.d_in} does not match site {site} of {lm.source} "
                     f"(width {width})")


def evaluate_saes(lm, saes: dict[str, tuple[SAE, str]], token_batches: list, dtype=jnp.float32,
                  progress: bool = True) -> dict[str, dict]:
  """{name: metrics} for SAEs `{name: (sae, site)}` on `token_batches` (SAEs cast to `dtype`)."""
  for name, (sae, site) in saes.items():
    check_sae(sae, site, lm, name)
  saes = {name: (sae.astype(dtype), site) for name, (sae, site) in saes.items()}
  splices = {name: _splice(sae) for name, (sae, _) in saes.items()}
  stats = {name: SAEStats() for name in saes}
  sites = sorted({site for _, site in saes.values()})
  ce = {k: 0.0 for k in ["clean", *(f"zero:{s}" for s in sites), *saes]}
  n_pred = 0
  for batch in tqdm(token_batches, desc=f"eval {len(saes)} SAEs ({jnp.dtype(dtype).name})", disable=not progress):
    keep_bt = batch.keep                                    # text positions
    pred_bt = keep_bt[:, 1:]                                # predictions of text tokens
    n_pred += int(pred_bt.sum())
    acts = lm.activations(batch.tokens, sites, dtype=dtype)
    ce["clean"] += float(np.sum(host_array(lm.token_losses(batch.tokens))[pred_bt]))
    for s in sites:
      ce[f"zero:{s}"] += float(np.sum(host_array(lm.token_losses(batch.tokens, replace={s: _zero}))[pred_bt]))
    for name, (sae, site) in saes.items():
      stats[name].add(sae, host_array(acts[site])[keep_bt])
      ce[name] += float(np.sum(host_array(lm.token_losses(batch.tokens, replace={site: splices[name]}))[pred_bt]))
  out = {}
  for name, (_, site) in saes.items():
    clean, zero, spliced = ce["clean"] / n_pred, ce[f"zero:{site}"] / n_pred, ce[name] / n_pred
    out[name] = stats[name].result() | {
        "site": site, "ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero,
        "delta_loss": spliced - clean, "loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
        "predictions": n_pred}
  return out


def saes_to_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, dict]:
  """The run's exports (export/index.json) and `eval.saes` paths: {name: {"path", "site", ...}}."""
  entries = {}
  index = Path(workdir) / "export" / "index.json"
  if index.exists():
    for e in json.loads(index.read_text()):
      entries[e["name"]] = {"path": e["gemma_scope"], "site": e["site"] or config.site, "width": e["width"],
                            "l1_coefficient": e["l1_coefficient"]}
  for path in config.eval.saes:
    sae = load_sae(path)
    site = sae.info.site or config.site
    if not site:
      raise ValueError(f"eval.saes {path}: the file does not say its site; set config.site")
    entries[str(path)] = {"path": str(path), "site": site, "width": sae.width, "l1_coefficient": sae.info.l1_coefficient}
  if not entries:
    raise FileNotFoundError(f"nothing to evaluate: no {index} and eval.saes is empty")
  return entries


def run_eval(config: ml_collections.ConfigDict, workdir: str | Path, lm=None, progress: bool = True) -> dict:
  """Evaluates every SAE of the run in float32 (and bfloat16 when `eval.bfloat16`); writes the report."""
  import jax
  from jax.experimental import multihost_utils

  from scope_jax.activations.extract import load_extraction_model
  from scope_jax.eval.report import write_report

  entries = saes_to_evaluate(config, workdir)
  lm = lm or load_extraction_model(config)
  token_batches = eval_batches(config, lm.tokenizer)
  saes = {name: (load_sae(e["path"], site=e["site"]), e["site"]) for name, e in entries.items()}
  results = evaluate_saes(lm, saes, token_batches, progress=progress)
  results_bf16 = None
  if config.eval.bfloat16:
    bf16_config = ml_collections.ConfigDict(config.to_dict())
    bf16_config.model_dtype = "bfloat16"
    results_bf16 = evaluate_saes(load_extraction_model(bf16_config), saes, token_batches, dtype=jnp.bfloat16,
                                 progress=progress)
  for name, e in entries.items():
    results[name] |= {"width": e["width"], "l1_coefficient": e["l1_coefficient"], "path": e["path"]}
    if results_bf16:
      results_bf16[name] |= {"width": e["width"], "l1_coefficient": e["l1_coefficient"], "path": e["path"]}
  files = {}
  if jax.process_index() == 0:
    files = write_report(results, results_bf16, Path(workdir) / "report", f"scope_jax report: {config.model}")
  multihost_utils.sync_global_devices("scope_jax eval: report written")  # later jobs check it
  return {"results": results, "results_bf16": results_bf16, "files": files}
