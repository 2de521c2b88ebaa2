"""`scope-jax finetune`: KL finetuning of every SAE of a finished training (finetune/kl.py), on
training text, never the evaluation's.

    WORKDIR/finetune/checkpoints/   every finetune.checkpoint_every steps (orbax); a rerun resumes
    WORKDIR/finetune/metrics.jsonl  KL, MSE, L0, α, λ per SAE every finetune.log_every steps
    WORKDIR/finetune/export/        the finetuned SAEs, each NAME-kl beside the export's NAME, in the
                                    export's formats, with their own index.json

Each step reads one batch of text: per site, the forward up to the site runs once, then the clean
forward from the site gives the log-probabilities every SAE there is compared with; each SAE's step
differentiates through the rest of the model (finetune/kl.py). Batches follow the step number, so a
resumed run sees the batches an uninterrupted one would: its parameters come out bit-identical.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from scope_jax.core.kinds import kind_named
from scope_jax.eval.evaluate import OverlapError, check_sae, sited_sae
from scope_jax.eval.statistics import sae_batch
from scope_jax.export.entries import ExportEntry, read_index
from scope_jax.export.exporter import jumprelu_files, write_exports
from scope_jax.finetune import kl
from scope_jax.layout import (
  FINETUNED_SUFFIX,
  RunLayout,
  check_replaceable,
  differences,
  finetune_identity,
  own_folder,
)
from scope_jax.models.sites import parse_site
from scope_jax.parallel.dispatch import settle
from scope_jax.parallel.mesh import host_array
from scope_jax.parallel.precision import at_precision
from scope_jax.sae.model import SAE, fold, unfold
from scope_jax.text.sequences import TokenBatch, batches, sequences
from scope_jax.text.sources import iter_documents
from scope_jax.train.checkpoints import Preemption


def check_text(config: ml_collections.ConfigDict) -> None:
  """Refuses finetuning text that is (or holds) evaluation text: `eval.text`, an `eval.domains`
  source read whole, or data.text's held-out documents."""
  eval_sources = set(config.eval.text) | {s for _, s in config.eval.domains if s not in config.data.text}
  if config.finetune.text:
    held_out = set() if config.eval.text else set(config.data.text)
    if clash := [s for s in config.finetune.text if s in eval_sources or s in held_out]:
      raise OverlapError(
        f"finetune.text {clash} is evaluation text (eval.text, an eval.domains source, or data.text, whose "
        "held-out documents are evaluated); leave finetune.text empty to finetune on data.text's training documents"
      )
    return
  if clash := [s for s in config.data.text if s in eval_sources]:
    raise OverlapError(
      f"data.text {clash} is also evaluation text (eval.text or eval.domains): finetuning would read it"
    )
  if not config.eval.text and not config.data.holdout_every:
    raise OverlapError(
      "data.holdout_every is 0 and eval.text is empty, so the evaluation text is all of data.text: finetuning on "
      "it would train on the evaluation; set data.holdout_every (and re-extract), eval.text or finetune.text"
    )


def finetune_documents(config: ml_collections.ConfigDict) -> Iterator[tuple[int, str]]:
  """`finetune.text`, else data.text's training documents (ids counted as extraction counts them)."""
  check_text(config)
  if config.finetune.text:
    yield from iter_documents(list(config.finetune.text), config.data.text_field)
    return
  every = config.data.holdout_every
  for doc_id, text in iter_documents(list(config.data.text), config.data.text_field):
    if not every or doc_id % every:
      yield doc_id, text


def text_batches(config: ml_collections.ConfigDict, tokenizer, skip: int = 0) -> Iterator[TokenBatch]:
  """The finetuning text as batches of `finetune.batch_size` packed sequences, its documents in
  order and again from the start when they run out; the first `skip` batches are passed over."""
  f = config.finetune
  while True:
    count = 0
    seqs = sequences(finetune_documents(config), tokenizer, f.seq_len, "pack")
    for batch in batches(seqs, f.batch_size, tokenizer.pad_id):
      count += 1
      if count > skip:
        yield batch
    if not count:
      raise ValueError(f"the finetuning text gives no sequence of finetune.seq_len {f.seq_len} tokens")
    skip = max(0, skip - count)


def check_fields(config: ml_collections.ConfigDict) -> int:
  """The number of steps `finetune.tokens` buys; a budget below one batch is refused."""
  f = config.finetune
  per_step = f.batch_size * f.seq_len
  if not isinstance(f.tokens, int) or f.tokens < per_step:
    raise ValueError(
      f"finetune.tokens = {f.tokens!r}: expected at least one batch, finetune.batch_size × finetune.seq_len = "
      f"{per_step:,} tokens"
    )
  return f.tokens // per_step


def finetune_entries(config: ml_collections.ConfigDict, workdir: str | Path) -> list[ExportEntry]:
  """The export's entries `finetune.saes` names (fnmatch patterns; none: all)."""
  layout = RunLayout(workdir)
  if config.kind == "clt":
    raise ValueError("finetune: KL finetuning trains SAEs and transcoders; a CLT (kind = 'clt') is not supported")
  if not layout.export_index.exists():
    raise FileNotFoundError(f"finetune: no {layout.export_index}; train and export first (`scope-jax run`)")
  entries = read_index(layout.export_index)
  patterns = list(config.finetune.saes)
  chosen = [e for e in entries if not patterns or any(fnmatch.fnmatch(e.name, p) for p in patterns)]
  if not chosen:
    raise ValueError(f"finetune.saes {patterns} names none of the export's SAEs: {[e.name for e in entries]}")
  if batchtopk := [e.name for e in chosen if e.activation == "batchtopk"]:
    raise ValueError(
      f"finetune: {batchtopk} are BatchTopK SAEs, released as JumpReLUs without a λ to hold their L0; "
      "KL finetuning takes JumpReLU (λ) and TopK (k) SAEs"
    )
  return chosen


@dataclasses.dataclass
class Member:
  """One SAE being finetuned: its export entry, its released file's SAE, its step's spec."""

  entry: ExportEntry
  released: SAE
  spec: kl.KLSpec

  @property
  def name(self) -> str:
    return self.entry.name + FINETUNED_SUFFIX

  def training_form(self) -> SAE:
    return unfold(self.released, self.entry.scale, self.entry.target_scale)

  def release(self, sae: SAE) -> SAE:
    return jax.tree.map(np.asarray, fold(sae, self.entry.scale, self.entry.target_scale)).replace(
      info=self.released.info
    )


def members(config: ml_collections.ConfigDict, entries: list[ExportEntry], lm) -> list[Member]:
  """Each entry's SAE, checked against the model (its sites reachable, its widths theirs)."""
  out = []
  f, r = config.finetune, config.recipe
  for e in entries:
    sae = sited_sae(e.sae_file, e.input_site, e.output_site)
    try:
      check_sae(sae, e.output_site, lm, e.name)
      site = parse_site(e.output_site, lm.config)
    except ValueError as error:
      raise ValueError(f"finetune: {e.sae_file}: {error}") from None
    spec = kl.KLSpec(
      site=site,
      scale=float(e.scale),
      target_scale=float(e.target_scale or e.scale),
      transcoder=e.output_site != e.input_site,
      k=e.k if e.activation == "topk" else None,
      bandwidth=r.bandwidth,
      sparsity_loss=r.sparsity_loss,
      target_l0=r.target_l0,
      alpha_rule=f.alpha,
      sparsity_rule=f.sparsity,
      l0_gain=f.l0_gain,
    )
    out.append(Member(e, sae, spec))
  return out


def _flat(state: dict) -> dict:
  """A pytree as {index: leaf} (what orbax saves: no custom nodes, no None leaves)."""
  return {f"{i:04d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}


def _checkpoints(layout: RunLayout, identity: dict) -> ocp.CheckpointManager:
  """The finetune's checkpoints; those of another finetuning (other SAEs or fields: a redo) are
  removed first (they are this stage's own files, and resuming from them would be wrong)."""
  saved = own_folder(layout.finetune, "finetune") / "identity.json"
  if layout.finetune_checkpoints.exists() and (
    not saved.exists() or differences(json.loads(saved.read_text()), identity)
  ):
    shutil.rmtree(layout.finetune_checkpoints)
    layout.finetune_metrics.unlink(missing_ok=True)
  if jax.process_index() == 0:
    saved.write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  return ocp.CheckpointManager(layout.finetune_checkpoints.absolute(), options=options)


def _site_batch(lm, clean_fn, batch: TokenBatch, site: str, inputs: set[str]) -> tuple[dict, dict]:
  """(the kl.Batch fields every SAE at `site` shares, {input site: its activation} for transcoders):
  the forward up to `site` and the clean forward from it run once here."""
  resid, act, _ = lm.to_site(batch.tokens, site)
  keep = np.zeros(act.shape[:2], np.float32)  # the batch padded to the mesh: padded rows count for nothing
  keep[: len(batch.keep)] = batch.keep
  keep[:, 0] = 0.0  # BOS is never spliced
  sharding = NamedSharding(lm.mesh, P("data"))
  shared = {
    "resid_btd": resid,
    "act_btd": act,
    "clean_logp_btv": clean_fn(lm.parts()[1], resid, act),
    "keep_bt": jax.device_put(keep, sharding),
    "pred_bt": jax.device_put(keep[:, 1:], sharding),
  }
  return shared, {s: lm.to_site(batch.tokens, s)[1] for s in inputs}


def _clean_fn(lm, site: str):
  graphdef = lm.parts()[0]
  parsed = parse_site(site, lm.config)
  return jax.jit(
    at_precision(
      lm.precision, lambda params, resid, act: kl.clean_log_probs(nnx.merge(graphdef, params), resid, act, parsed)
    )
  )


def _measure(lm, group: list[Member], states: dict, token_batches: list[TokenBatch]) -> tuple[dict, int]:
  """({name: firing densities `[M]`} of the finetuned SAEs (released form), text positions counted)
  on `token_batches`, BOS excluded; the forward up to each site runs once per batch."""
  released = {m.name: m.release(states[m.name]["sae"]) for m in group}
  sites = {s for m in group for s in (m.entry.input_site, m.entry.output_site)}
  fires, tokens = {m.name: 0.0 for m in group}, 0
  for batch in token_batches:
    acts = {site: lm.to_site(batch.tokens, site)[1] for site in sites}
    keep = np.zeros(next(iter(acts.values())).shape[:2], bool)  # the batch padded to the mesh
    keep[: len(batch.keep), 1:] = batch.keep[:, 1:]
    for m in group:
      inputs = acts[m.entry.input_site] if m.spec.transcoder else None
      _, sums = sae_batch(released[m.name], acts[m.entry.output_site], jnp.asarray(keep), inputs)
      fires[m.name] = fires[m.name] + host_array(sums["fires_m"]).astype(np.float64)
    tokens += int(keep.sum())
  return {name: f / max(tokens, 1) for name, f in fires.items()}, tokens


def run_finetune(config: ml_collections.ConfigDict, workdir: str | Path, lm=None, progress: bool = True) -> dict:
  """KL-finetunes the export's SAEs (resuming from the latest checkpoint); writes their export."""
  from scope_jax.activations.extract import load_extraction_model

  layout = RunLayout(workdir)
  steps = check_fields(config)
  check_text(config)
  entries = finetune_entries(config, workdir)
  if jax.process_index() == 0:
    check_replaceable(layout.finetune)  # a finetune/ scope_jax did not make is refused before any work
    layout.unmark("finetune")
  identity = finetune_identity(config, layout)
  lm = lm or load_extraction_model(config)
  if lm.tokenizer is None:
    raise ValueError(f"finetune: {lm.source} has no tokenizer to read the finetuning text with")
  group = members(config, entries, lm)
  f, r = config.finetune, config.recipe
  tx = kl.optimizer(f.lr, steps, f.warmup_steps, f.schedule, r.adam_b1, r.adam_b2, f.clip_grad_norm)
  replicated = NamedSharding(lm.mesh, P())
  states = {
    m.name: jax.device_put(kl.init_state(m.training_form(), tx, m.entry.l1_coefficient or 0.0), replicated)
    for m in group
  }
  manager = _checkpoints(layout, identity)
  start = manager.latest_step() or 0
  if start:
    states = _restore(manager, start, states)
  text = text_batches(config, lm.tokenizer, skip=start)
  began = time.perf_counter()
  try:
    states = _steps(config, layout, lm, group, tx, states, text, range(start, steps), manager, progress)
  finally:
    manager.close()
  seconds = time.perf_counter() - began
  densities, measured = _measure(lm, group, states, [next(text) for _ in range(f.measure_batches)])
  out = _export(config, layout, group, states, densities, measured, progress)
  if jax.process_index() == 0:
    layout.mark_finished("finetune", identity)
  multihost_utils.sync_global_devices("scope_jax finetune: files written")  # eval reads them next
  tokens = steps * f.batch_size * f.seq_len
  return {"entries": out, "steps": steps, "resumed_at": start, "seconds": seconds, "tokens": tokens}


def _step_all(lm, by_site: dict, step_fns: dict, clean_fns: dict, states: dict, batch: TokenBatch) -> dict:
  """One step of every SAE on `batch` (`states` updated in place): per site the forward up to it
  and the clean forward once, then each SAE's step. Returns each SAE's loss terms."""
  terms = {}
  for site, at_site in by_site.items():
    inputs = {m.entry.input_site for m in at_site if m.spec.transcoder}
    shared, input_acts = _site_batch(lm, clean_fns[site], batch, site, inputs)
    for m in at_site:
      rows = kl.Batch(input_btd=input_acts.get(m.entry.input_site, shared["act_btd"]), **shared)
      states[m.name], terms[m.name] = step_fns[m.spec](states[m.name], lm.parts()[1], rows)
      settle(states[m.name], lm.mesh)  # one program in flight on a multi-device CPU mesh (parallel/dispatch.py)
  return terms


def _restore(manager: ocp.CheckpointManager, step: int, states: dict) -> dict:
  """`states` as checkpoint `step` holds them, placed as `states` is."""
  abstract = _flat(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), states))
  flat = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return jax.tree.unflatten(jax.tree.structure(states), [flat[k] for k in sorted(flat)])


def _steps(config, layout: RunLayout, lm, group: list[Member], tx, states: dict, text, steps: range, manager, progress):
  """The finetuning steps `steps` on `text`'s batches: per site, the shared forward once, then each
  SAE's step; logged and checkpointed on schedule. Returns the states after the last."""
  f, by_site = config.finetune, {}
  for m in group:
    by_site.setdefault(m.entry.output_site, []).append(m)
  step_fns = {spec: kl.jitted_step(spec, tx, lm.precision, lm.parts()[0]) for spec in {m.spec for m in group}}
  clean_fns = {site: _clean_fn(lm, site) for site in by_site}
  last, preemption = steps.stop, Preemption()
  bar = tqdm(total=last, initial=steps.start, desc=f"KL finetune {len(group)} SAEs", unit="step", disable=not progress)
  try:
    with bar, open(layout.finetune_metrics, "a") as log:
      for s in steps:
        terms = _step_all(lm, by_site, step_fns, clean_fns, states, next(text))
        if (s + 1) % f.log_every == 0 or s + 1 == last:
          logged = {name: {k: float(v) for k, v in t.items()} for name, t in terms.items()}
          if jax.process_index() == 0:
            log.write(json.dumps({"step": s + 1, "saes": logged}) + "\n")
            log.flush()
          bar.set_postfix(
            kl=np.mean([t["kl"] for t in logged.values()]), l0=np.mean([t["l0"] for t in logged.values()])
          )
        stopping = preemption.reached(s + 1)  # SIGTERM or Ctrl-C: save this step and stop
        if (s + 1) % f.checkpoint_every == 0 or s + 1 == last or stopping:
          manager.save(s + 1, args=ocp.args.StandardSave(_flat(states)))
          manager.wait_until_finished()
        if stopping:
          raise preemption.stopped(s + 1)
        bar.update(1)
  finally:
    preemption.restore()  # the previous SIGTERM and Ctrl-C handlers
  return states


def _export(config, layout: RunLayout, group: list[Member], states: dict, densities: dict, measured: int, progress):
  """The finetuned SAEs as the export writes SAEs, under finetune/export/ with their index."""
  root, files_to_write, entries = layout.finetune_export, [], []
  for m in group:
    density_m = densities[m.name]
    l0 = float(density_m.sum())
    files = {"saelens": str(root / "saelens" / f"{m.entry.input_site}-{m.name}")}
    if m.entry.activation != "topk":
      files |= jumprelu_files(root, config, m.entry.width, l0, kind_named(config.kind), m.name, entries)
    lam = m.entry.l1_coefficient
    if lam is not None and m.spec.sparsity_rule == "hold_l0":  # the λ it ended with
      lam = float(states[m.name]["lambda"])
    entry = dataclasses.replace(
      m.entry,
      name=m.name,
      l1_coefficient=lam,
      l0=l0,
      dead_fraction=float(np.mean(density_m == 0)),
      measured_rows=measured,
      files=files,
    )
    entries.append(entry)
    released = m.release(jax.tree.map(np.asarray, states[m.name]["sae"]))
    released = released.replace(info=dataclasses.replace(released.info, l1_coefficient=lam))
    files_to_write.append((released, entry, np.log10(density_m + 1e-10)))
  if jax.process_index() == 0:
    write_exports(root, files_to_write, progress)
  return entries
