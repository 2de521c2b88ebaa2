"""The `scope-jax` command.

    scope-jax demo [--model ...]
    scope-jax extract|train|export|finetune|eval|run --config configs/FILE.py[:ARGS] --workdir DIR [--config.F=V ...]
    scope-jax sweep --config configs/FILE.py[:ARGS] --workdir DIR [--dry_run [--target SLICE]] [--jobs PATTERNS]
    scope-jax transcoder-set TRANSCODER... --out DIR      (circuit-tracer's transcoder set: tools/circuit_tracer)

Multi-process runs add --coordinator HOST:PORT --num_processes N --process_id I (or the
SCOPE_JAX_* variables; scope_jax/parallel/distributed.py).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

from scope_jax.layout import RUN_NAMES, NotOurs, RunLayout, open_workdir, set_storage_policy
from scope_jax.parallel.mesh import use_xnnpack_on_cpu

REDO_STAGES = ("export", "finetune", "eval", "browse")  # finished stages --redo may replace
# OS errors that are the user's to fix (full disk, permissions): one line, no traceback
USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR)
CONFIG_COMMANDS = ("extract", "train", "export", "finetune", "eval", "browse", "run", "sweep")
PLANNED_COMMANDS = ("sweep", "train")  # with --dry_run --target: what each job needs on a slice


def demo(args: argparse.Namespace) -> None:
  """Loads a model, continues a prompt greedily, and prints activation statistics at sites."""
  import scope_jax as sj

  start = time.perf_counter()
  lm = sj.load_model(args.model)
  c = lm.config
  print(
    f"loaded {lm.source} in {time.perf_counter() - start:.1f}s: {c.model_type}, d_model={c.d_model}, "
    f"{c.n_layers} layers, {c.n_heads} heads / {c.n_kv_heads} kv, vocab {c.vocab_size}, "
    f"mesh {dict(lm.mesh.shape)}"
  )
  if lm.tokenizer is None:
    sys.exit(f"{lm.source} has no tokenizer (tokenizer.model beside the checkpoint)")
  prompt_ids = lm.tokenizer.encode(args.prompt)
  out = lm.generate(prompt_ids, args.max_new_tokens)
  print(f"\n{args.prompt}\033[1m{lm.tokenizer.decode(out[len(prompt_ids) :])}\033[0m\n")
  tokens = np.asarray([prompt_ids])
  acts = lm.activations(tokens, args.sites.split(","))
  print(f"{'site':>10} {'shape':>16} {'mean ||x||':>12} {'max |x|':>10}   (BOS excluded)")
  for site, act in acts.items():
    x = np.asarray(act)[0, 1:]
    print(f"{site:>10} {str(tuple(act.shape)):>16} {np.linalg.norm(x, axis=-1).mean():12.2f} {np.abs(x).max():10.2f}")


def parse_config_command(command: str, argv: list[str]):
  """`--config FILE[:ARGS] --workdir DIR [--config.FIELD=VALUE ...]` -> (config, workdir)."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  argv = [f"scope-jax {command}", *argv]
  config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:ARGS]", flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and exports", flag_values=fv)
  flags.DEFINE_string("coordinator", None, "multi-process: the coordinator's host:port", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "multi-process: how many processes run this command", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "multi-process: this process's index", flag_values=fv)
  flags.DEFINE_boolean(
    "use_existing_workdir",
    False,
    "let --workdir be a non-empty folder that is not a scope_jax run: the run writes only its own names there",
    flag_values=fv,
  )
  flags.DEFINE_multi_enum(
    "redo", [], REDO_STAGES, "replace this finished stage although its fields changed (repeatable)", flag_values=fv
  )
  if command in PLANNED_COMMANDS:
    flags.DEFINE_boolean("dry_run", False, "print the plan and exit", flag_values=fv)
    flags.DEFINE_string(
      "target", None, "with --dry_run: what each job needs on this slice (v4-32, h100x8, ...)", flag_values=fv
    )
  if command == "sweep":
    flags.DEFINE_string(
      "jobs", None, "run only jobs whose names match these comma-separated fnmatch patterns", flag_values=fv
    )
  try:
    fv(argv)
  except flags.Error as e:
    sys.exit(f"scope-jax {command}: {e}")
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no field of the config
    overrides = " ".join(a for a in argv if a.startswith("--config."))
    guess = re.search(r'Did you mean "([^"]+)"', str(e))
    hint = f'; did you mean "{guess.group(1)}"?' if guess else ""
    sys.exit(f"scope-jax {command}: no such config field in {overrides}{hint}")
  if fv.config is None or fv.workdir is None:
    sys.exit(f"scope-jax {command}: --config and --workdir are required")
  return fv


def stage_extract(config, workdir, redo=()) -> None:
  from scope_jax.activations.extract import extract
  from scope_jax.activations.writer import NonFiniteActivations

  try:
    s = extract(config, workdir)
  except NonFiniteActivations as e:
    sys.exit(f"scope-jax extract: {e}")
  if s["already_finished"]:
    print(f"extract: {s['root']} already finished ({s['rows']:,} rows); nothing to do")
  else:
    print(
      f"extract: {s['root']}: {s['rows']:,} rows in this process's shards, {s['tokens_processed']:,} tokens "
      f"in {s['seconds']:.0f}s ({s['tokens_per_s']:,.0f} tok/s)"
      + (f"; resumed at batch {s['resumed_at_batch']}" if s["resumed_at_batch"] else "")
    )


def stage_train(config, workdir, redo=()) -> None:
  from scope_jax.train import Preempted, TrainingDiverged, train

  try:
    if config.kind == "clt":
      from scope_jax.train.clt_run import train_clt

      state = train_clt(config, workdir)
    else:
      state = train(config, workdir)
  except TrainingDiverged as e:
    sys.exit(f"scope-jax train: {e}")
  except Preempted as e:
    print(f"scope-jax train: {e}", file=sys.stderr)
    sys.exit(128 + e.signal)
  print(f"train: step {int(state['step'])}; checkpoints and metrics.jsonl in {workdir}")


def stage_export(config, workdir, redo=()) -> None:
  """Exports the latest checkpoint, unless an export of it with these fields exists (layout.py:
  each stage's marker holds the identity it was made from; changed export fields are refused)."""
  from scope_jax.export import export
  from scope_jax.layout import export_identity

  layout = RunLayout(workdir)
  if not layout.to_do("export", export_identity(config, layout), redo):
    print(f"export: {layout.export} is up to date; skipped")
    return
  if config.kind == "clt":
    from scope_jax.export.clt import export_clt

    for e in export_clt(config, workdir):
      per_layer = " ".join(f"{v:.1f}" for v in e["l0_per_layer"])
      print(f"{e['name']:>24}  L0 {e['l0']:8.1f} (per layer {per_layer})  dead {e['dead_fraction']:.1%}")
      print(f"{'':>24}  {', '.join(e['files'].values())}")
    return
  entries = export(config, workdir)
  for e in entries:
    print(f"{e.name:>24}  L0 {e.l0:8.1f}  dead {e.dead_fraction:.1%}  {e.sae_file}")
  print(
    f"export: {len(entries)} SAEs, each trained on {entries[0].epochs:.2f} epochs of its data; "
    f"L0 and dead latents measured on {entries[0].measured_rows:,} rows; index in {RunLayout(workdir).export_index}"
  )


def stage_finetune(config, workdir, redo=()) -> None:
  """KL-finetunes the export's SAEs, unless a finetune of this export with these fields exists
  (changed finetune fields are refused, as for export, unless --redo=finetune)."""
  from scope_jax.finetune import run_finetune
  from scope_jax.layout import finetune_identity

  layout = RunLayout(workdir)
  if not layout.to_do("finetune", finetune_identity(config, layout), redo):
    print(f"finetune: {layout.finetune_export} is up to date; skipped")
    return
  from scope_jax.train import Preempted

  try:
    out = run_finetune(config, workdir)
  except Preempted as e:
    print(f"scope-jax finetune: {e}", file=sys.stderr)
    sys.exit(128 + e.signal)
  for e in out["entries"]:
    print(f"{e.name:>24}  L0 {e.l0:8.1f}  dead {e.dead_fraction:.1%}  {e.sae_file}")
  resumed = f", resumed at step {out['resumed_at']}" if out["resumed_at"] else ""
  print(
    f"finetune: {len(out['entries'])} SAEs, {out['steps']} steps of {out['tokens'] // out['steps']:,} tokens "
    f"({out['tokens']:,} tokens each) in {out['seconds']:.0f}s{resumed}; index in {layout.finetune_index}"
  )


def stage_eval(config, workdir, redo=()) -> None:
  """Evaluates the export, unless a report of it with these fields exists (as for export)."""
  from scope_jax.eval import run_eval
  from scope_jax.layout import eval_identity

  layout = RunLayout(workdir)
  if not layout.to_do("eval", eval_identity(config, layout), redo):
    print(f"eval: {layout.report} is up to date; skipped")
    return
  if config.kind == "clt":
    from scope_jax.eval.replacement import run_clt_eval

    out = run_clt_eval(config, workdir)
    for name, r in out["results"].items():
      print(
        f"{name:>24}  {r['kind']:<14} L0 {r['l0']:7.1f}  Δloss (all MLPs replaced) {r['delta_loss']:+.3f} ± "
        f"{r['delta_loss_se']:.3f}  mean FVU {np.mean(r['fvu_per_layer']):.3f}"
      )
    if out["files"]:
      print(f"eval: report in {out['files']['md']} (and replacement.json)")
    return

  out = run_eval(config, workdir)
  for name, r in sorted(out["results"].items()):
    print(
      f"{name:>24}  L0 {r['l0']:8.1f}  Δloss {r['delta_loss']:+.3f} ± {r['delta_loss_se']:.3f}  "
      f"FVU {r['fvu']:.3f} ± {r['fvu_se']:.3f}  recovered {r['loss_recovered_mean']:.1%} (mean abl.)  "
      f"silent on the eval text {r['dead_fraction']:.1%}"
    )
  if out["files"]:
    print(f"eval: report in {out['files']['html']} (and report.md, metrics.json)")


def stage_browse(config, workdir, redo=()) -> None:
  """Writes the feature browser of the export, unless one of it with these fields exists."""
  from scope_jax.browse import browse_identity, run_browse

  if config.kind == "clt":
    sys.exit(
      "scope-jax browse: the feature browser shows SAEs' and transcoders' latents; a CLT's span layers (kind = 'clt')"
    )
  layout = RunLayout(workdir)
  if not layout.to_do("browse", browse_identity(config, layout), redo):
    print(f"browse: {layout.browse / 'index.html'} is up to date; skipped")
    return
  out = run_browse(config, workdir)
  if jax.process_index() == 0:
    print(f"browse: {sum(out['saes'].values()):,} latents of {len(out['saes'])} SAEs in {out['index']}")


def stage_train_export_eval(config, workdir, redo=()) -> None:
  """train -> export (-> finetune) -> eval (-> browse); a stage already run on the same inputs is skipped."""
  stage_train(config, workdir)
  stage_export(config, workdir, redo)
  if config.finetune.enabled:
    stage_finetune(config, workdir, redo)
  stage_eval(config, workdir, redo)
  if config.browse.enabled:
    stage_browse(config, workdir, redo)


def stage_run(config, workdir, redo=()) -> None:
  """extract -> train -> export -> eval; finished stages are skipped on a re-run."""
  stage_extract(config, workdir)
  stage_train_export_eval(config, workdir, redo)
  layout = RunLayout(workdir)
  formats = "circuit-tracer and Gemma Scope 2" if config.kind == "clt" else "Gemma Scope npz and SAELens"
  report = layout.report / ("report.md" if config.kind == "clt" else "report.html")
  print(f"\ndone: exports in {layout.export} ({formats}), report in {report}")
  if config.finetune.enabled:
    print(f"KL-finetuned SAEs (NAME-kl, the same formats): {layout.finetune_export}")
  if config.browse.enabled:
    print(f"feature browser: {layout.browse / 'index.html'} (opens from the file system)")


def stage_sweep(config, workdir, dry_run: bool, patterns: str | None, redo=(), target: str | None = None) -> None:
  """Prints the job table (and with `target` what each job needs there); without `dry_run` runs
  every unfinished job in order."""
  from scope_jax import grid
  from scope_jax.lease import holding

  planned = grid.select(grid.plan(config, workdir), patterns)
  if jax.process_index() == 0:  # one table in a pod's merged log, not one per host
    print(grid.table(planned))
    if target:
      print(grid.cost_table(planned, target))
  if dry_run:
    return
  for i, job in enumerate(planned):
    print(f"\n=== job {i + 1}/{len(planned)}: {job.name} ({job.workdir})")
    if grid.is_finished(job):
      print("finished earlier; skipped")
      continue
    with holding(job.workdir, "workdir"):
      if job.stage == "extract":
        stage_extract(job.config, job.workdir)
      else:
        stage_train_export_eval(job.config, job.workdir, redo)


def stage_train_plan(config, workdir, target: str) -> None:
  """What the trainer job of `config` needs on the slice `target` (the sweep's plan for one job)."""
  from scope_jax import grid

  if config.kind == "clt":
    sys.exit("scope-jax train --dry_run --target: planning a CLT job on a slice is not supported (kind = 'clt')")
  if config.site is None:
    raise ValueError("config.site is unset: name the site to train on")
  job = grid.Job("train", f"train/{config.site}", str(workdir), config, (config.site,), tuple(config.sweep.widths))
  print(grid.cost_table([job], target))


# Every stage takes (config, workdir, redo); only export, finetune, eval and browse have anything to redo.
STAGES = {
  "extract": stage_extract,
  "train": stage_train,
  "export": stage_export,
  "finetune": stage_finetune,
  "eval": stage_eval,
  "browse": stage_browse,
  "run": stage_run,
}


def _hint(e: Exception) -> str:
  """What to do next, for the failures whose message does not say it (a full disk)."""
  if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
    return "\nthe disk is full: free space and run the same command; it resumes from what was committed"
  return ""


def workdir_names(command: str, fv) -> tuple[str, ...]:
  """The names a command writes at the top of its workdir: a run's, or a sweep's job folders."""
  if command != "sweep":
    return RUN_NAMES
  from scope_jax import grid

  root = Path(fv.workdir).absolute()
  paths = [Path(job.workdir).absolute() for job in grid.plan(fv.config, fv.workdir) if "://" not in job.workdir]
  return tuple(sorted({p.relative_to(root).parts[0] for p in paths if root in p.parents}))


def take_workdir(workdir: str, use_existing: bool, names: tuple[str, ...]) -> None:
  """layout.open_workdir on process 0; every process of the job stops together when it refuses."""
  from scope_jax.parallel.distributed import stop_together

  failure = None
  if jax.process_index() == 0:
    try:
      open_workdir(workdir, use_existing, names)
    except NotOurs as e:
      failure = e
  stop_together(failure, lambda: NotOurs(f"--workdir {workdir} was refused (process 0's log says why)"))


def run_config_command(command: str, argv: list[str]) -> None:
  """Parses the flags, joins the other processes (if any), runs the stage."""
  from scope_jax.activations.store import StoreError
  from scope_jax.config import validate
  from scope_jax.lease import LeaseHeld, holding
  from scope_jax.parallel.distributed import initialize

  fv = parse_config_command(command, argv)
  try:
    validate(fv.config, command)
    set_storage_policy(fv.config.storage)
    initialize(fv.coordinator, fv.num_processes, fv.process_id)
    if command in PLANNED_COMMANDS and fv.target and not fv.dry_run:
      raise ValueError(f"--target plans a {command} for another slice: add --dry_run")
    if command == "train" and fv.dry_run:
      if not fv.target:
        raise ValueError("train --dry_run prints what the job needs on a slice: add --target (v4-32, h100x8, ...)")
      stage_train_plan(fv.config, fv.workdir, fv.target)
    elif command == "sweep":
      if not fv.dry_run:
        take_workdir(fv.workdir, fv.use_existing_workdir, workdir_names(command, fv))
      stage_sweep(fv.config, fv.workdir, fv.dry_run, fv.jobs, fv.redo, fv.target)
    else:
      with holding(fv.workdir, "workdir"):  # first: the check below must not race another job's
        take_workdir(fv.workdir, fv.use_existing_workdir, RUN_NAMES)
        STAGES[command](fv.config, fv.workdir, fv.redo)
  except (ValueError, FileNotFoundError, StoreError, LeaseHeld) as e:  # the user's to fix
    sys.exit(f"scope-jax {command}: {e}{_hint(e)}")
  except OSError as e:
    if e.errno not in USER_OS_ERRORS:
      raise  # unexpected: keeps its traceback
    sys.exit(f"scope-jax {command}: {e}{_hint(e)}")
  except KeyboardInterrupt:
    print(f"scope-jax {command}: interrupted (Ctrl-C); run the same command to resume", file=sys.stderr)
    sys.exit(130)


def prepare_environment() -> None:
  """The process settings the library leaves alone, made here before anything starts: XLA:CPU's
  XNNPACK kernels, gloo for collectives between CPU processes, and gcsfs's stable filesystem
  rather than its experimental zonal one."""
  use_xnnpack_on_cpu()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def match(args) -> None:
  """`scope-jax match`: adjacent-layer matches of the given SAEs, written as a small report."""
  from scope_jax.activations.store import StoreError, open_store
  from scope_jax.analysis.matching import adjacent_matches, write_match_report
  from scope_jax.sae import load_sae

  try:
    saes = [load_sae(p) for p in args.saes]
    store = open_store(args.store) if args.store else None
    files = write_match_report(adjacent_matches(saes, store, args.rows), args.out)
  except (ValueError, FileNotFoundError, StoreError) as e:
    sys.exit(f"scope-jax match: {e}")
  print(f"match: {len(saes) - 1} adjacent pairs in {files['markdown']} (and matches.json, matching.png)")


def transcoder_set(args) -> None:
  """`scope-jax transcoder-set`: per-layer transcoders (any order) as circuit-tracer's transcoder set."""
  from scope_jax.models.sites import parse_site
  from scope_jax.sae import load_sae
  from scope_jax.sae.clt_io import save_transcoder_set

  try:
    saes = [load_sae(p) for p in args.transcoders]
    for path, sae in zip(args.transcoders, saes):
      if not sae.info.target_site:
        raise ValueError(f"{path}: an SAE of {sae.info.site}, not a transcoder (mlp_in.L -> mlp.L)")
    saes.sort(key=lambda sae: parse_site(sae.info.site).layer)
    out = save_transcoder_set(saes, args.model or saes[0].info.model, args.out)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"scope-jax transcoder-set: {e}")
  print(f"transcoder-set: {len(saes)} layers in {out} (circuit-tracer: model_kind transcoder_set)")


def fake_devices_for_target(argv: list[str]) -> None:
  """`sweep` or `train` `--dry_run --target T` compiles each job's step for T's chips: as many fake CPU devices,
  set before the backend starts (XLA reads its flags once). An unknown name is left to the flag's
  own check, which names the targets."""
  from scope_jax.parallel.devices import TARGETS

  values = [a.split("=", 1)[1] for a in argv if a.startswith("--target=")]
  values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--target"]
  if values and values[-1] in TARGETS:
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={TARGETS[values[-1]].chips}".strip()


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] and argv[0] in PLANNED_COMMANDS:
    fake_devices_for_target(argv)
  prepare_environment()
  if argv and argv[0] in CONFIG_COMMANDS:
    run_config_command(argv[0], argv[1:])
    return
  parser = argparse.ArgumentParser(prog="scope-jax", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("demo", help="generate text and print activation statistics at sites")
  p.add_argument(
    "--model", default="gemma3-270m", help="HF directory, google-deepmind checkpoint, .gguf file or embedded name"
  )
  p.add_argument("--prompt", default="The Gemma Scope sparse autoencoders were trained to")
  p.add_argument("--max-new-tokens", type=int, default=20)
  p.add_argument("--sites", default="res.6,mlp.6,att.6,mlp_in.6,res.12")
  p.set_defaults(run=demo)
  p = commands.add_parser(
    "match", help="match latents of SAEs at adjacent layers (decoder cosine, activation correlation)"
  )
  p.add_argument("saes", nargs="+", help="SAE files or folders (any format load_sae reads), one per layer")
  p.add_argument("--store", default="", help="an activation store holding the SAEs' sites, for activation correlations")
  p.add_argument("--rows", type=int, default=0, help="store rows to correlate over (0 = all)")
  p.add_argument("--out", required=True, help="folder for matches.json, matches.md and matching.png")
  p.set_defaults(run=match)
  p = commands.add_parser("transcoder-set", help="per-layer transcoders as circuit-tracer's transcoder set")
  p.add_argument(
    "transcoders", nargs="+", help="transcoder files or folders (any format load_sae reads), one per layer"
  )
  p.add_argument("--model", default="", help="the model's name in config.yaml (default: the transcoders')")
  p.add_argument("--out", required=True, help="folder for config.yaml and layer_L.safetensors")
  p.set_defaults(run=transcoder_set)
  for name in CONFIG_COMMANDS:
    commands.add_parser(name, help=f"{name} (--config FILE[:ARGS] --workdir DIR [--config.FIELD=VALUE])")
  args = parser.parse_args(argv)
  args.run(args)


if __name__ == "__main__":
  main()
