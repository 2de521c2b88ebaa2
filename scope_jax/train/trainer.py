"""The training loop: resume, step, log, checkpoint, stop cleanly on SIGTERM or divergence.

    state = train(config, workdir)          # or train(config, workdir, source=ArraySource(...))

The run is assembled by train/run.py; what is saved and when, and preemption, are
train/checkpoints.py's. The loader position *is* the step: a source's batch for step `s` is a
pure function of (seed, s), so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import jax
import ml_collections
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from scope_jax.data.batch import BatchSource
from scope_jax.layout import RunLayout
from scope_jax.parallel.dispatch import settle
from scope_jax.train import stacked
from scope_jax.train.checkpoints import Checkpointer, Preemption, restore_or_init, restore_selection
from scope_jax.train.health import MetricWriter, check_finite, health_warnings, per_sae_metrics
from scope_jax.train.run import open_run
from scope_jax.train.selection import StepChooser


def report_health(workdir: Path, last: dict, groups: list[stacked.Group], steps: int) -> None:
  """Warns about training that went wrong (train/health.py health_warnings) and keeps the
  warnings in `WORKDIR/train_health.json` for the report."""
  found = health_warnings(last, groups, steps)
  for message in found:
    warnings.warn(message, stacklevel=2)
  if jax.process_index() == 0:
    RunLayout(workdir).health.write_text(json.dumps({"step": steps, "warnings": found}, indent=2) + "\n")


def train(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  source: BatchSource | None = None,
  progress: bool = True,
) -> dict:
  """Trains the config's sweep to `train.steps`, resuming from `workdir`; returns the final state."""
  workdir = Path(workdir)
  run = open_run(config, workdir, source)
  groups, source = run.groups, run.source
  try:  # a refusal here still closes the run (its checkpoint manager and the loader's threads)
    state = restore_or_init(run.checkpoints, run.identity, run.built.init, run.built.shardings)
    checkpointer = Checkpointer(run.checkpoints, run.identity, groups, config.train.checkpoint_every)
    start = int(state["step"])
    if start > config.train.steps:
      raise ValueError(
        f"train.steps = {config.train.steps}, but {workdir / 'checkpoints'} holds a checkpoint of step {start}; "
        "set train.steps to at least that, or use another workdir (its exports were made from the later step)"
      )
    writer = MetricWriter(workdir, start)
    chooser = StepChooser(
      config.train.step,
      config.train.capacity,
      [g.width for g in groups],
      run.built.make_step,
      restore_selection(run.checkpoints),
      config.train.log_every,
    )
  except BaseException:
    run.close()
    raise
  if start:
    tqdm.write(f"train: resuming from the checkpoint of step {start} in {workdir / 'checkpoints'}")
  names = [g.names for g in groups]
  preemption = Preemption()
  steps, every_log = config.train.steps, config.train.log_every
  bar = tqdm(
    total=steps,
    initial=start,
    desc=f"train {sum(len(n) for n in names)} SAEs",
    unit="step",
    disable=not progress or jax.process_index() != 0,
  )
  t0, done, values = time.perf_counter(), 0, {}
  try:
    rows = source.batch(start) if start < steps else None
    for s in range(start, steps):
      state, metrics = chooser.run(s, state, rows)
      run.checkpoints.check_for_errors()  # a failed asynchronous save ends the run now, not at the next save
      if s + 1 < steps:
        rows = source.batch(s + 1)  # built on the host while the step runs
      settle(state, run.mesh)  # XLA:CPU: the next step is dispatched once this one has finished
      done += 1
      if (s + 1) % every_log == 0 or s + 1 == steps:
        values = per_sae_metrics(names, metrics)
        writer.write(s + 1, values)
        chooser.observe(s + 1, [max(values[n]["slots_max"] for n in group) for group in names])
        check_finite(state, groups, checkpointer.latest)
        rate = done * source.batch_size / (time.perf_counter() - t0)
        first = next(iter(values.values()))
        bar.set_postfix_str(f"{rate:,.0f} tok/s, L0 {first['l0']:.1f}, FVU {first['fvu']:.3f} ({names[0][0]})")
      bar.update(1)
      if checkpointer.on_schedule(s + 1, steps):
        checkpointer.save(s + 1, state, chooser.record())
      if preemption.reached(s + 1):
        checkpointer.finish(s + 1, state, chooser.record())
        raise preemption.stopped(s + 1)
    if start < steps and checkpointer.finish(steps, state, chooser.record()):
      report_health(workdir, values, groups, steps)
    run.checkpoints.wait_until_finished()
    multihost_utils.sync_global_devices("scope_jax train: checkpoints final")  # later stages list them
  finally:
    preemption.restore()
    bar.close()
    writer.close()
    run.close()
  return state
