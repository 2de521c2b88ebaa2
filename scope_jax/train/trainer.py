"""The training loop: resume, step, log, checkpoint, stop cleanly on SIGTERM or divergence.

    state = train(config, workdir)          # or train(config, workdir, source=ArraySource(...))

Checkpoints (orbax `CheckpointManager`, asynchronous, every `train.checkpoint_every` steps,
keeping `train.keep_checkpoints`) hold the whole state (SAE stacks, Adam state, step, dead-latent
counters) and the run's identity. The loader position *is* the step: a source's batch for step
`s` is a pure function of (seed, s), so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import warnings
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from scope_jax.data.source import BatchSource
from scope_jax.layout import RunLayout
from scope_jax.train import stacked
from scope_jax.train.checkpoints import open_run, restore_or_init, restore_selection, state_checksum
from scope_jax.train.health import MetricWriter, health_warnings, per_sae_metrics
from scope_jax.train.selection import StepChooser


class TrainingDiverged(RuntimeError):
  """A loss became NaN or Inf; the message names the SAE and step."""


class Preempted(SystemExit):
  """SIGTERM (or Ctrl-C's SIGINT) arrived; a checkpoint of the current step was saved."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signal = signum  # the exit code is 128 + signum, as the shell reports a killed process


def check_finite(state: dict, groups: list[stacked.Group], last_checkpoint: int | None) -> None:
  for group, bad in zip(groups, state["first_bad_step"]):
    bad = np.asarray(bad)
    if (bad >= 0).any():
      i = int(np.argmax(bad >= 0))
      raise TrainingDiverged(
        f"SAE {group.names[i]}: loss became NaN or Inf at step {int(bad[i])}; "
        f"the last checkpoint (step {last_checkpoint}) is kept, nothing later was saved"
      )


class _Preemption:
  """SIGTERM (preemption) or Ctrl-C, acted on by every process at the same step.

  One process: Python handlers of SIGTERM and SIGINT set `signal`, which the loop checks between
  steps (a second Ctrl-C interrupts at once). Several: JAX's preemption service (started by
  `jax.distributed.initialize`) catches SIGTERM on any process and agrees with the others on a
  step at which all of them stop, so their checkpoint is of one step. It must be asked at every step.
  """

  def __init__(self):
    self.signal = 0
    self._previous = {}
    self.shared = jax.process_count() > 1
    if not self.shared and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    self.signal = signum
    signal.signal(signal.SIGINT, self._previous[signal.SIGINT])  # a second Ctrl-C stops at once

  def reached(self, step: int) -> bool:
    if self.shared and multihost_utils.reached_preemption_sync_point(step):
      self.signal = signal.SIGTERM
    return bool(self.signal)

  def restore(self):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


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
  groups, source, identity, mngr = run.groups, run.source, run.identity, run.checkpoints
  try:  # a refusal here still closes the run (its checkpoint manager and the loader's thread)
    state = restore_or_init(mngr, identity, run.init, run.shardings)
    latest = mngr.latest_step()  # after restore_or_init set any damaged checkpoint aside
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
      run.make_step,
      restore_selection(mngr),
      config.train.log_every,
    )
  except BaseException:
    run.close()
    raise
  if start:
    tqdm.write(f"train: resuming from the checkpoint of step {start} in {workdir / 'checkpoints'}")
  names = [g.names for g in groups]
  preemption = _Preemption()
  steps, every_log, every_ckpt = config.train.steps, config.train.log_every, config.train.checkpoint_every
  bar = tqdm(
    total=steps,
    initial=start,
    desc=f"train {sum(len(n) for n in names)} SAEs",
    unit="step",
    disable=not progress or jax.process_index() != 0,
  )
  t0, done, values = time.perf_counter(), 0, {}

  def save(step: int) -> None:
    nonlocal latest
    check_finite(state, groups, latest)
    mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        identity=ocp.args.JsonSave(identity),
        selection=ocp.args.JsonSave(chooser.record()),
        checksum=ocp.args.JsonSave(state_checksum(state)),
      ),
      force=True,
    )
    latest = step

  try:
    x_bd = source.batch(start) if start < steps else None
    for s in range(start, steps):
      state, metrics = chooser.run(s, state, x_bd)
      mngr.check_for_errors()  # a failed asynchronous save ends the run now, not at the next save
      if s + 1 < steps:
        x_bd = source.batch(s + 1)  # built on the host while the step runs
      done += 1
      if (s + 1) % every_log == 0 or s + 1 == steps:
        values = per_sae_metrics(names, metrics)
        writer.write(s + 1, values)
        chooser.observe(s + 1, [max(values[n]["slots_max"] for n in group) for group in names])
        check_finite(state, groups, latest)
        rate = done * source.batch_size / (time.perf_counter() - t0)
        first = next(iter(values.values()))
        bar.set_postfix_str(f"{rate:,.0f} tok/s, L0 {first['l0']:.1f}, FVU {first['fvu']:.3f} ({names[0][0]})")
      bar.update(1)
      if (s + 1) % every_ckpt == 0 and s + 1 < steps:
        save(s + 1)
      if preemption.reached(s + 1):
        if latest != s + 1:
          save(s + 1)
        mngr.wait_until_finished()
        name, number = signal.Signals(preemption.signal).name, preemption.signal
        raise Preempted(f"{name}: saved a checkpoint at step {s + 1}; run the same command to resume", number)
    if latest != steps and start < steps:
      save(steps)
      report_health(workdir, values, groups, steps)
    mngr.wait_until_finished()
    multihost_utils.sync_global_devices("scope_jax train: checkpoints final")  # later stages list them
  finally:
    preemption.restore()
    bar.close()
    writer.close()
    run.close()
  return state
