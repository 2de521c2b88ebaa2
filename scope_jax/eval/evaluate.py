"""`scope-jax eval`: every SAE of a run (and any SAE `load_sae` reads) on held-out text.

For each SAE: L0, MSE, FVU, latent densities (eval/statistics.py), and the next-token loss with
its reconstruction spliced in at its site, beside the clean loss and the loss with the site
zero-ablated and mean-ablated (replaced by its mean over the evaluation text):

    delta loss       = CE(spliced) - CE(clean)              the headline number, with its standard error
    loss recovered   = (CE(ablated) - CE(spliced)) / (CE(ablated) - CE(clean)), zero and mean

Zero-ablating a site with a large constant offset (Gemma 3's residual stream) costs more than a
uniform guess, so loss recovered against zero flatters every SAE; mean-ablation is the fairer
reference, Δ loss the honest one.

The engine splits the forward at the site (`lm.to_site`, `lm.token_losses_from_site`): the layers
up to the site run once per batch and are shared by every SAE there; only the rest of the forward
runs per SAE and per reference, from activations that never leave the devices.

Special tokens are masked throughout: SAE statistics use only positions holding text tokens,
the loss only predictions of text tokens, and splices leave BOS (position 0) untouched.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from scope_jax.eval.statistics import SAEStats, SiteStats, ratio_and_standard_error, sae_batch
from scope_jax.export.entries import read_index
from scope_jax.layout import (
  FINETUNED_SUFFIX,
  RunLayout,
  check_replaceable,
  eval_identity,
  finetune_is_current,
  staged_directory,
)
from scope_jax.models.sites import parse_site, site_width
from scope_jax.parallel.mesh import host_array
from scope_jax.parallel.precision import traced_at
from scope_jax.sae.io import load_sae
from scope_jax.sae.model import SAE
from scope_jax.text.sequences import batches, sequences
from scope_jax.text.sources import iter_documents, iter_entry_documents


class OverlapError(ValueError):
  """The evaluation text is (or may be) part of the training text."""


def eval_documents(config: ml_collections.ConfigDict):
  """`eval.text` if given, else the documents extraction held out (id % holdout_every == 0)."""
  if config.eval.text:
    yield from iter_documents(list(config.eval.text), config.data.text_field)
    return
  every = config.data.holdout_every
  if not every:
    message = (
      "the evaluation text is the training text: data.holdout_every is 0 and eval.text is empty; "
      "set data.holdout_every (documents kept out of extraction) or eval.text"
    )
    if config.eval.strict:
      raise OverlapError(message)
    warnings.warn(message, stacklevel=2)
  for doc_id, text in iter_documents(list(config.data.text), config.data.text_field):
    if not every or doc_id % every == 0:
      yield doc_id, text


def domain_documents(config: ml_collections.ConfigDict, source: str):
  """An `eval.domains` source's evaluation text: when the source is one of `data.text`, its
  documents extraction held out (ids counted over all of data.text, as extraction counts them);
  otherwise all of it (never trained on)."""
  if source not in config.data.text:
    yield from iter_documents(source, config.data.text_field)
    return
  every = config.data.holdout_every
  if not every:
    raise OverlapError(
      f"eval.domains {source!r} is training text (in data.text) and data.holdout_every is 0, so none of it "
      "is held out; set data.holdout_every or name a source that is not trained on"
    )
  seen = False
  for doc_id, entry, text in iter_entry_documents(list(config.data.text), config.data.text_field):
    if entry == source:
      seen = True
      if doc_id % every == 0:
        yield doc_id, text
    elif seen:  # past the source: the rest of data.text is not read
      return


def eval_batches(
  config: ml_collections.ConfigDict, tokenizer, documents=None, n_sequences: int = 0, what: str = ""
) -> list:
  """Batches of `n_sequences` (default `eval.sequences`) packed sequences of `documents` (default
  the evaluation text), rounded up to whole batches; fewer when the text runs out (a warning), at
  least two (a standard error needs two)."""
  e = config.eval
  n_sequences = n_sequences or e.sequences
  what = what or "the held-out documents (or eval.text)"
  out = list(
    batches(
      sequences(eval_documents(config) if documents is None else documents, tokenizer, e.seq_len, "pack"),
      e.batch_size,
      tokenizer.pad_id,
      max_batches=-(-n_sequences // e.batch_size),
    )
  )
  found = sum(int(b.keep.any(axis=1).sum()) for b in out)
  if found < 2:
    raise ValueError(
      f"eval set too small: {what} give {found} sequence(s) of "
      f"{e.seq_len} tokens; standard errors need at least 2 (hold out more text or shorten eval.seq_len)"
    )
  if found < n_sequences:
    warnings.warn(
      f"eval set smaller than asked: {what} give {found} sequences of {e.seq_len} tokens, {n_sequences} were asked for",
      stacklevel=2,
    )
  return out


def check_sae(sae: SAE, site: str, lm, name: str) -> None:
  """The SAE reads a site of `lm` as wide as its input and writes one as wide as its output; a
  transcoder's input site is of the layer of the site it replaces."""
  input_site = sae.info.site if sae.info.target_site else site
  for what, where, size in (("input", input_site, sae.d_in), ("output", site, sae.W_dec.shape[-1])):
    width = site_width(parse_site(where, lm.config), lm.config)
    if size != width:
      raise ValueError(f"SAE {name}: {what} width {size} does not match site {where} of {lm.source} (width {width})")
  if sae.info.target_site and parse_site(input_site).layer != parse_site(site).layer:
    raise ValueError(f"transcoder {name}: input site {input_site} is not of the layer of its target {site}")


@jax.jit
def _ablate(act_btd: jax.Array, value_d: jax.Array) -> jax.Array:
  """The site's activation replaced by `value_d` at every position but BOS."""
  return act_btd.at[:, 1:].set(value_d.astype(act_btd.dtype))


def _padded(mask_bt: np.ndarray, rows: int) -> np.ndarray:
  """A text-position mask padded with empty rows to the batch the model ran (the mesh's multiple)."""
  return np.concatenate([mask_bt, np.zeros((rows - len(mask_bt), mask_bt.shape[1]), bool)])


class _Losses:
  """Per-sequence sums of next-token losses over predictions of text tokens, per forward."""

  def __init__(self):
    self.sums: dict[str, list[np.ndarray]] = {}
    self.counts: list[np.ndarray] = []

  def add(self, key: str, losses_bt: jax.Array, pred_bt: np.ndarray) -> None:
    self.sums.setdefault(key, []).append(
      np.sum(host_array(losses_bt)[: len(pred_bt)] * pred_bt, axis=1, dtype=np.float64)
    )

  def total(self, key: str) -> np.ndarray:
    return np.concatenate(self.sums[key])

  def mean(self, key: str) -> float:
    return float(self.total(key).sum() / self.predictions.sum())

  @property
  def predictions(self) -> np.ndarray:
    return np.concatenate(self.counts)


def _evaluate_site(lm, site: str, saes: dict[str, SAE], token_batches: list, bar, ablations: bool) -> dict[str, dict]:
  """Every SAE of one site. Pass 1 runs the forward up to the site for its mean and variance; pass 2
  runs it again, then the rest of the forward once per SAE and per reference (clean and, with
  `ablations`, zero- and mean-ablated), all from the same on-device activations. A transcoder
  replaces the site (its target, the MLP's output) with its prediction from its input site of the
  same layer (the MLP's input), read by one more forward up to that site."""
  site_stats = SiteStats()
  for batch in token_batches:
    _, act, _ = lm.to_site(batch.tokens, site)
    site_stats.add(act, _padded(batch.keep, act.shape[0]))
    bar.update(1)
  mean_d = jnp.asarray(site_stats.mean, jnp.float32)
  losses, stats = _Losses(), {name: SAEStats() for name in saes}
  for batch in token_batches:
    resid, act, _ = lm.to_site(batch.tokens, site)
    keep_bt, pred_bt = _padded(batch.keep, act.shape[0]), batch.keep[:, 1:]
    losses.counts.append(pred_bt.sum(axis=1).astype(np.float64))
    references = {"clean": act}
    if ablations:
      references |= {"zero": _ablate(act, jnp.zeros_like(mean_d)), "mean": _ablate(act, mean_d)}
    for key, replaced in references.items():
      losses.add(key, lm.token_losses_from_site(batch.tokens, site, resid, replaced), pred_bt)
    inputs = {
      s: lm.to_site(batch.tokens, s)[1] for s in {sae.info.site for sae in saes.values() if sae.info.target_site}
    }
    for name, sae in saes.items():
      spliced, sums = sae_batch(sae, act, keep_bt, inputs.get(sae.info.site) if sae.info.target_site else None)
      stats[name].add(sums, batch.keep.sum(axis=1))
      losses.add(name, lm.token_losses_from_site(batch.tokens, site, resid, spliced), pred_bt)
    bar.update(1)
  clean = losses.mean("clean")
  out = {}
  for name in saes:
    spliced = losses.mean(name)
    delta, delta_se = ratio_and_standard_error(losses.total(name) - losses.total("clean"), losses.predictions)
    out[name] = stats[name].result(site_stats.variance) | {
      "site": site,
      "ce_clean": clean,
      "ce_spliced": spliced,
      "delta_loss": delta,
      "delta_loss_se": delta_se,
      "predictions": int(losses.predictions.sum()),
      "sequences": int(np.sum(losses.predictions > 0)),
    }
    if ablations:
      zero, mean = losses.mean("zero"), losses.mean("mean")
      out[name] |= {
        "ce_zero_ablation": zero,
        "ce_mean_ablation": mean,
        "delta_loss_zero_ablation": zero - clean,  # what the site is worth: the SAE's Δ loss should be far below
        "delta_loss_mean_ablation": mean - clean,
        "loss_recovered": _recovered(zero, spliced, clean),
        "loss_recovered_mean": _recovered(mean, spliced, clean),
      }
  return out


def evaluate_saes(
  lm,
  saes: dict[str, tuple[SAE, str]],
  token_batches: list,
  dtype=jnp.float32,
  progress: bool = True,
  ablations: bool = True,
) -> dict[str, dict]:
  """{name: metrics} for SAEs `{name: (sae, site)}` on `token_batches`, SAEs cast to `dtype` (the
  model runs in its own dtype: pass `lm.astype(dtype)` for a low-precision evaluation). Without
  `ablations` the zero- and mean-ablated references (and the loss recovered against them) are
  left out: two of the forward's passes per batch fewer, for evaluations that report Δ loss only.

  The model compiles two programs per site (the forward up to it, the forward from it to the
  loss) whatever the number of SAEs; each SAE shape compiles one small program. Every program's
  matmuls run at the model's precision (`lm.precision`, parallel/precision.py).
  """
  for name, (sae, site) in saes.items():
    check_sae(sae, site, lm, name)
  by_site: dict[str, dict[str, SAE]] = {}
  for name, (sae, site) in saes.items():
    by_site.setdefault(site, {})[name] = sae.astype(dtype)
  out = {}
  with (
    tqdm(
      total=2 * len(token_batches) * len(by_site),
      desc=f"eval {len(saes)} SAEs ({jnp.dtype(dtype).name})",
      unit="batch",
      disable=not progress,
    ) as bar,
    traced_at(lm.precision),
  ):
    for site in sorted(by_site):
      out |= _evaluate_site(lm, site, by_site[site], token_batches, bar, ablations)
  return {name: out[name] for name in saes}


def _recovered(ablated: float, spliced: float, clean: float) -> float:
  """The fraction of the ablation's loss increase the SAE recovers."""
  return (ablated - spliced) / (ablated - clean) if ablated != clean else float("nan")


@dataclasses.dataclass(frozen=True)
class EvalEntry:
  """An SAE to splice in (an export of the run, a Matryoshka prefix of one, or an `eval.saes` file)."""

  path: str
  input_site: str
  output_site: str  # where its reconstruction is spliced: input_site for an SAE
  width: int
  l1_coefficient: float | None
  dead_export: float | None = None  # dead on the export's measurement rows (exports only)
  prefix: int | None = None  # a Matryoshka prefix: its first `prefix` latents
  k: int | None = None  # a TopK or BatchTopK SAE's k (its λ is None)
  finetuned: bool = False  # KL-finetuned (finetune/export/index.json)

  def about(self) -> dict:
    """What the report shows of it beside its results."""
    return {
      "width": self.width,
      "l1_coefficient": self.l1_coefficient,
      "k": self.k,
      "path": self.path,
      "dead_export": self.dead_export,
      "finetuned": self.finetuned,
    }


def saes_to_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, EvalEntry]:
  """The run's exports (export/index.json), its KL-finetuned SAEs (finetune/export/index.json,
  named NAME-kl) and `eval.saes` paths, by name."""
  entries = {}
  layout = RunLayout(workdir)
  index = layout.export_index
  finetuned = []
  if layout.finetune_index.exists() and finetune_is_current(config, layout):
    finetuned = read_index(layout.finetune_index)
  elif layout.finetune_index.exists():
    warnings.warn(
      f"{layout.finetune_export} holds KL-finetuned SAEs of an older export (or an unfinished finetune); they are "
      "not evaluated: run `scope-jax finetune` on this export",
      stacklevel=2,
    )
  exported = read_index(index) if index.exists() else []
  for e, tuned in [(e, False) for e in exported] + [(e, True) for e in finetuned]:
    entries[e.name] = EvalEntry(
      e.sae_file,
      e.input_site or config.site,
      e.output_site or config.site,
      e.width,
      e.l1_coefficient,
      e.dead_fraction,
      k=e.k,
      finetuned=tuned,
    )
    if not tuned:  # a Matryoshka SAE's narrower prefixes, each on its own (finetuning trains the whole width)
      for m in e.prefixes[:-1]:
        entries[f"{e.name}@{m}"] = dataclasses.replace(entries[e.name], prefix=m, width=m, dead_export=None)
  for path in config.eval.saes:
    sae = load_sae(path)
    site = sae.info.site or config.site
    if not site:
      raise ValueError(f"eval.saes {path}: the file does not say its site; set config.site")
    entries[str(path)] = EvalEntry(
      str(path), site, sae.info.target_site or site, sae.width, sae.info.l1_coefficient, k=sae.info.k
    )
  if not entries:
    raise FileNotFoundError(f"nothing to evaluate: no {index} and eval.saes is empty")
  return entries


def sited_sae(path: str, input_site: str, output_site: str) -> SAE:
  """The SAE file at `path` read as reading `input_site` and writing `output_site` (a transcoder's
  target, when the two differ)."""
  sae = load_sae(path, site=input_site)
  if output_site != input_site:
    sae = sae.replace(info=dataclasses.replace(sae.info, target_site=output_site))
  return sae


def entry_sae(entry: EvalEntry) -> SAE:
  """The SAE of a `saes_to_evaluate` entry: its file read with its sites, cut to its prefix."""
  sae = sited_sae(entry.path, entry.input_site, entry.output_site)
  return prefix_sae(sae, entry.prefix) if entry.prefix else sae


def prefix_sae(sae: SAE, m: int) -> SAE:
  """The SAE of the first `m` latents (a Matryoshka prefix)."""
  cut = {k: getattr(sae, k)[..., :m] for k in ("W_enc", "b_enc", "threshold")}
  return sae.replace(**cut, W_dec=sae.W_dec[:m])


def check_standard_errors(results: dict[str, dict], target: float) -> list[str]:
  """Warnings for SAEs whose Δ loss standard error is above `target` (0: no target), each naming
  how many sequences would meet it (SE falls as 1/sqrt(sequences))."""
  messages = []
  for name, r in results.items():
    se, n = r["delta_loss_se"], r["sequences"]
    if target and not se <= target:
      need = "more than 1" if not np.isfinite(se) else f"about {int(np.ceil(n * (se / target) ** 2))}"
      messages.append(
        f"eval set too small for SAE {name}: standard error of Δ loss {se:.3g} nats on {n} sequences, "
        f"above eval.delta_loss_se = {target:g}; {need} sequences would meet it (eval.sequences)"
      )
  for message in messages:
    warnings.warn(message, stacklevel=2)
  return messages


def run_eval(config: ml_collections.ConfigDict, workdir: str | Path, lm=None, progress: bool = True) -> dict:
  """Evaluates every SAE of the run in float32 (and bfloat16 when `eval.bfloat16`, the model's and
  SAEs' parameters cast, not reloaded); writes the report."""
  from jax.experimental import multihost_utils

  from scope_jax.activations.extract import load_extraction_model
  from scope_jax.eval.report import domain_section, finetune_section, quantization_section, write_report
  from scope_jax.sae.quantize import quantized

  layout = RunLayout(workdir)
  entries = saes_to_evaluate(config, workdir)
  if jax.process_index() == 0:
    check_replaceable(layout.report)  # a report/ scope_jax did not make is refused now, not after the evaluation
    layout.unmark("eval")
  lm = lm or load_extraction_model(config)
  token_batches = eval_batches(config, lm.tokenizer)
  saes = {name: (entry_sae(e), e.output_site) for name, e in entries.items()}
  results = evaluate_saes(lm, saes, token_batches, progress=progress)
  warnings_ = check_standard_errors(results, config.eval.delta_loss_se)
  results_bf16 = None
  if config.eval.bfloat16:
    results_bf16 = evaluate_saes(lm.astype(jnp.bfloat16), saes, token_batches, dtype=jnp.bfloat16, progress=progress)
  for name, e in entries.items():
    about = e.about()
    results[name] |= about
    if results_bf16:
      results_bf16[name] |= about
  sections = []
  if config.eval.domains:
    per_domain = {
      domain: evaluate_saes(
        lm,
        saes,
        eval_batches(
          config,
          lm.tokenizer,
          domain_documents(config, source),
          config.eval.domain_sequences,
          f"eval.domains {domain} ({source})",
        ),
        progress=progress,
        ablations=False,  # the domain table reports Δ loss, FVU and L0
      )
      for domain, source in config.eval.domains
    }
    sections.append(domain_section(per_domain, dict(config.eval.domains)))
  if any(e.finetuned for e in entries.values()):
    sections.append(finetune_section(results, FINETUNED_SUFFIX))
  if config.eval.quantize:
    q_batches = token_batches[: -(-config.eval.quantize_sequences // config.eval.batch_size) or None]
    variants = dict(saes)
    for fmt in config.eval.quantize:
      variants |= {f"{name}@{fmt}": (quantized(sae, fmt), site) for name, (sae, site) in saes.items()}
    q_results = evaluate_saes(lm, variants, q_batches, progress=progress, ablations=False)
    sections.append(quantization_section(q_results, list(saes), tuple(config.eval.quantize)))
  files = {}
  if jax.process_index() == 0:
    trained = json.loads(layout.health.read_text())["warnings"] if layout.health.exists() else []
    with staged_directory(layout.report, "report") as staging:  # no plot of an older report survives
      written = write_report(
        results,
        results_bf16,
        staging,
        f"scope_jax report: {config.model}",
        trained + warnings_,
        layout.metrics,
        sections,
      )
    files = {key: layout.report / path.name for key, path in written.items()}
    layout.mark_finished("eval", eval_identity(config, layout))
  multihost_utils.sync_global_devices("scope_jax eval: report written")  # later jobs check it
  return {"results": results, "results_bf16": results_bf16, "files": files, "warnings": warnings_, "sections": sections}
