"""A run's orbax checkpoints: the manager, what is saved and when (`Checkpointer`), preemption,
restore (verified, another run's refused, a damaged one set aside) and the migration of older
layouts. Each checkpoint holds every SAE stack, Adam state, step, dead-latent counters, the run's
identity (`run_identity`), the step choices (train/selection.py) and a checksum of the state.

    state = restore_or_init(manager, identity, init, shardings)      # training
    restored = restore_latest(workdir, config, source)               # export: nothing compiled
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scope_jax.data.batch import BatchSource
from scope_jax.layout import NotOurs, RunLayout, differences, owned, some_names
from scope_jax.train import stacked
from scope_jax.train.health import check_finite

# The trainer state's layout: 2 = latent-major W_enc and Adam's latent_step (train/params.py).
# Checkpoints of layout 1 (W_enc [S, d, M], no latent_step) have no field; they are converted.
STATE_LAYOUT = 2


def run_identity(config: ml_collections.ConfigDict, source: BatchSource) -> dict:
  """What must not change between a run and its resumption."""
  return {
    "state_layout": STATE_LAYOUT,
    "kind": config.kind,
    "init_from": config.train.init_from,
    "seed": config.seed,
    "sweep": config.sweep.to_dict(),
    "recipe": config.recipe.to_dict(),
    "batch_size": config.train.batch_size,
    "normalize": config.data.normalize,
    "data": source.describe(),
  }


def checkpoint_manager(workdir: Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """orbax's manager of `WORKDIR/checkpoints`, made only once that directory exists (a directory
  orbax cannot create fails in its background thread, and the process then hangs on exit)."""
  path = RunLayout(workdir).checkpoints.absolute()
  if jax.process_index() == 0:
    try:
      path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
      raise ValueError(f"{path} is a file, not a directory; move it away") from e
    _check_only_checkpoints(path)
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, enable_async_checkpointing=True)
  return ocp.CheckpointManager(path, options=options, item_names=("state", "identity", "selection", "checksum"))


class OtherRun(ValueError):
  """The checkpoints belong to another run (or a newer scope_jax): never a damaged checkpoint."""


DAMAGED_PREFIX = ".damaged-"  # CHECKPOINTS/.damaged-STEP-TIME: a checkpoint that failed to restore, set aside


def _check_only_checkpoints(path: Path) -> None:
  """Refuses (NotOurs) a checkpoints folder holding what orbax did not write, unless scope_jax made
  the folder: orbax would take a user's numbered folder for a step, and prune it."""
  own = lambda p: p.name.isdigit() or p.name.startswith(DAMAGED_PREFIX) or ".orbax-checkpoint-tmp" in p.name
  if (foreign := [p.name for p in path.iterdir() if not own(p)]) and not owned(path):
    raise NotOurs(
      f"{path} holds files that are not scope_jax checkpoints ({some_names(foreign)}); they are left as they "
      "are: move them away or use another --workdir"
    )


def restore_or_init(mngr, identity: dict, init, shardings) -> dict:
  """The newest checkpoint that restores whole (refusing a different run), else a fresh state.

  A checkpoint that fails to restore (a truncated or damaged file, a step directory without its
  state) is named on stderr and moved aside to `CHECKPOINTS/.damaged-STEP-TIME`, never deleted,
  once an older one has restored; training then continues from that one, and since batches are
  addressed by step it ends as a run that never had the damaged checkpoint would. When none
  restores, the error names each and nothing is moved."""
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return init()
  failures = []
  _ignore_orphaned_reads()  # before: a failed restore's reads can land while its error is still raised
  for step in steps:
    try:
      state = _restore_step(mngr, step, identity, init, shardings)
    except OtherRun:
      raise
    except Exception as e:  # orbax and tensorstore raise many types for a damaged file
      failures.append((step, e))
      continue
    for bad, e in failures:
      _set_aside(mngr, bad, e, step)
    if failures:
      mngr.reload()
    return state
  raise ValueError(
    f"{mngr.directory}: no checkpoint restores whole; each failed:\n  "
    + "\n  ".join(f"step {step} ({Path(mngr.directory) / str(step)}): {_first_line(e)}" for step, e in failures)
    + "\nnothing was moved or removed: restore the files from a backup, or use a new --workdir to train again"
  )


def _ignore_orphaned_reads() -> None:
  """Silences the reads a failed restore leaves behind, from before the first restore on (they
  can complete while the restore's error is still being raised, before any handler runs).

  orbax 0.12 gathers a restore's reads as asyncio tasks and closes their event loop as soon as the
  first read fails. The reads still in flight are reported after the failure has been handled, as
  tracebacks, dozens in all, on two channels: one that completes into the closed loop goes to
  `sys.unraisablehook` (`RuntimeError: Event loop is closed`); one that had failed before the loop
  closed is logged by asyncio when its task is collected ("Task exception was never retrieved").
  Only those are dropped: the hook passes any other error on, and the log filter drops only
  never-retrieved task errors raised in orbax's code."""
  previous = sys.unraisablehook
  if getattr(previous, "scope_jax_orphaned_reads", False):
    return

  def hook(unraisable) -> None:
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)

  hook.scope_jax_orphaned_reads = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_orphaned_task_errors)


def _orphaned_task_errors(record: logging.LogRecord) -> bool:
  """False (drop) for asyncio's report of a task whose error nobody read, raised in orbax's code."""
  if not record.getMessage().startswith("Task exception was never retrieved") or not record.exc_info:
    return True
  frames = traceback.extract_tb(record.exc_info[2])
  return not any(f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in frame.filename for frame in frames)


def _first_line(e: BaseException) -> str:
  """The first line of the innermost cause (orbax wraps tensorstore's error in a long description)."""
  while e.__cause__ is not None:
    e = e.__cause__
  return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]


def _set_aside(mngr, step: int, error: Exception, restored: int) -> None:
  """Moves the damaged checkpoint of `step` out of orbax's sight, keeping every file of it."""
  path = Path(mngr.directory) / str(step)
  aside = path.with_name(f"{DAMAGED_PREFIX}{step}-{time.strftime('%Y%m%d-%H%M%S')}")
  if jax.process_index() == 0:
    path.rename(aside)
    print(
      f"scope_jax: the checkpoint of step {step} ({path}) is damaged ({_first_line(error)}); moved aside to "
      f"{aside.name}, resuming from the intact checkpoint of step {restored}",
      file=sys.stderr,
      flush=True,
    )
  multihost_utils.sync_global_devices(f"scope_jax: checkpoint {step} set aside")


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of each element of `x` as a uint32."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _leaf_checksums(state: dict) -> list[jax.Array]:
  """Two position-weighted sums mod 2^32 of every leaf's bits (`[2]` uint32 per leaf). Each weight is
  odd, so any one flipped bit changes the first sum; it is elementwise and a reduction, so it runs
  where the state's shards are, without moving them."""

  def sums(x):
    bits = _as_uint32(x)
    strides = [math.prod(x.shape[k + 1 :]) % 2**32 for k in range(x.ndim)]
    index = sum(
      (jax.lax.broadcasted_iota(jnp.uint32, x.shape, k) * jnp.uint32(st) for k, st in enumerate(strides)),
      jnp.zeros(x.shape, jnp.uint32),
    )
    first = jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)
    second = jnp.sum((bits ^ jnp.uint32(0x5BD1E995)) * (2 * (index * jnp.uint32(2654435761)) + 1), dtype=jnp.uint32)
    return jnp.stack([first, second])

  return [sums(x) for x in jax.tree.leaves(state)]


def state_checksum(state: dict) -> dict:
  """What is saved beside a checkpoint's state (the `checksum` item) to verify it on restore."""
  sums = [np.asarray(s.addressable_data(0)).tolist() for s in _leaf_checksums(state)]
  return {"sums": sums, "rule": "per leaf: sum(bits * (2i+1)), sum((bits ^ 0x5bd1e995) * (2(i*2654435761)+1)) mod 2^32"}


def _verify(mngr, step: int, state: dict) -> None:
  """Raises when the restored `state` is not what was saved (checkpoints saved before the checksum
  existed are taken as they are)."""
  if not (Path(mngr.directory) / str(step) / "checksum").exists():
    return
  saved = mngr.restore(step, args=ocp.args.Composite(checksum=ocp.args.JsonRestore()))["checksum"]["sums"]
  restored = state_checksum(state)["sums"]
  if saved != restored:
    bad = sum(a != b for a, b in zip(saved, restored)) + abs(len(saved) - len(restored))
    raise ValueError(f"{bad} of its {len(saved)} arrays differ from the checksum saved with them")


def _restore_step(mngr, step: int, identity: dict, init, shardings) -> dict:
  """The state saved at `step`, verified against its checksum, after checking it is this run's
  (OtherRun otherwise)."""
  saved = mngr.restore(step, args=ocp.args.Composite(identity=ocp.args.JsonRestore()))["identity"]
  layout = saved.setdefault("state_layout", 1)
  if layout not in (1, STATE_LAYOUT):
    raise OtherRun(
      f"{mngr.directory}/{step}: a checkpoint of state layout {layout}, written by a newer scope_jax "
      f"(this one reads layouts 1 and {STATE_LAYOUT}); resume it with that version"
    )
  # A recipe field added since the checkpoint was written ran at its default (which keeps the old behaviour).
  saved["recipe"] = dataclasses.asdict(stacked.Recipe()) | saved["recipe"]
  saved["sweep"] = {"prefixes": [], "activation": "jumprelu", "k": []} | saved["sweep"]  # so did fields added elsewhere
  saved = {"kind": "sae", "init_from": ""} | saved
  if diffs := differences(saved | {"state_layout": STATE_LAYOUT}, identity):
    raise OtherRun(
      f"{mngr.directory} holds checkpoints of another run; differing fields:\n  "
      + "\n  ".join(diffs)
      + "\nuse a new --workdir, or restore the old config"
    )
  abstract = stacked.abstract_state(init, shardings)
  if layout == 1:
    return _from_layout_1(mngr, step, abstract, shardings)
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  _verify(mngr, step, state)
  return state


def _from_layout_1(mngr, step: int, abstract: dict, shardings: dict) -> dict:
  """A checkpoint of state layout 1 in today's layout: `W_enc` and its moments transposed to
  `[S, M, d]`, every latent's moments current at the checkpoint's step (layout 1 updated every
  latent every step). The files are left as they are; the next checkpoint is of layout 2."""

  def as_saved(p):  # W_enc as layout 1 held it: [S, d, M], latents still on `model`
    w = p.W_enc
    spec = w.sharding.spec
    sharding = NamedSharding(w.sharding.mesh, P(spec[0], spec[2], spec[1]))
    return p.replace(W_enc=jax.ShapeDtypeStruct((w.shape[0], w.shape[2], w.shape[1]), w.dtype, sharding=sharding))

  moments = {k: tuple(map(as_saved, v)) for k, v in abstract["opt_state"].items() if k != "latent_step"}
  saved = abstract | {"params": tuple(map(as_saved, abstract["params"])), "opt_state": moments}
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(saved)))["state"]

  def convert(state):
    swap = lambda p: p.replace(W_enc=jnp.swapaxes(p.W_enc, -1, -2))
    latent_step = tuple(jnp.full(p.b_enc.shape, state["step"], jnp.int32) for p in state["params"])
    opt = {k: tuple(map(swap, v)) for k, v in state["opt_state"].items()}
    return state | {"params": tuple(map(swap, state["params"])), "opt_state": opt | {"latent_step": latent_step}}

  return jax.jit(convert, out_shardings=shardings, donate_argnums=0)(state)


def restore_selection(mngr) -> dict | None:
  """The step choices saved beside the latest checkpoint (train/selection.py), if any: checkpoints
  written before `train.step` existed have none."""
  step = mngr.latest_step()
  if step is None or not (Path(mngr.directory) / str(step) / "selection").exists():
    return None
  return mngr.restore(step, args=ocp.args.Composite(selection=ocp.args.JsonRestore()))["selection"]


@dataclasses.dataclass(frozen=True)
class Restored:
  """A run's latest checkpoint as export reads it."""

  state: dict
  groups: tuple[stacked.Group, ...]
  divisors: tuple[float, float | None]  # what the batches' inputs and targets were divided by (the source's)


def restore_latest(workdir: str | Path, config: ml_collections.ConfigDict, source: BatchSource) -> Restored:
  """The latest checkpoint of `config`'s run in `workdir` on `source`'s mesh (another run's is
  refused, a damaged one set aside as in training); no step is built and nothing is allocated
  but the state."""
  sweep = stacked.sweep_from(config)
  manager = checkpoint_manager(Path(workdir), config)
  try:
    if manager.latest_step() is None:
      raise FileNotFoundError(f"{RunLayout(workdir).checkpoints}: no checkpoint to export; run `scope-jax train` first")
    # jit is lazy: the initializer is only traced, for the state's shapes
    init, shardings = stacked.initializer(sweep, source.mesh, np.zeros(source.output_width), source.input_width)
    state = restore_or_init(manager, run_identity(config, source), init, shardings)
  finally:
    manager.close()
  return Restored(state, sweep.groups, source.divisors)


class Checkpointer:
  """What training saves and when: every `every` steps, the last step, and the step a
  preemption stops at; never a state in which a loss became NaN or Inf (`check_finite`)."""

  def __init__(self, manager: ocp.CheckpointManager, identity: dict, groups, every: int):
    self.manager, self.identity, self.groups, self.every = manager, identity, groups, every
    self.latest = manager.latest_step()  # read after a restore set any damaged checkpoint aside

  def save(self, step: int, state: dict, selection: dict) -> None:
    """Saves `state` as the checkpoint of `step`, asynchronously (`selection`: the step choices)."""
    check_finite(state, self.groups, self.latest)
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        identity=ocp.args.JsonSave(self.identity),
        selection=ocp.args.JsonSave(selection),
        checksum=ocp.args.JsonSave(state_checksum(state)),
      ),
      force=True,
    )
    self.latest = step

  def on_schedule(self, step: int, last: int) -> bool:
    """Whether the state after `step` steps is saved on the way to `last` (the last one is saved by `finish`)."""
    return step % self.every == 0 and step < last

  def finish(self, step: int, state: dict, selection: dict) -> bool:
    """Saves the state of `step` unless it is already saved, waits for every save; True when it saved."""
    saved = self.latest != step
    if saved:
      self.save(step, state, selection)
    self.manager.wait_until_finished()
    return saved


class Preempted(SystemExit):
  """SIGTERM (or Ctrl-C's SIGINT) arrived; a checkpoint of the current step was saved."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signal = signum  # the exit code is 128 + signum, as the shell reports a killed process


class Preemption:
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

  def stopped(self, step: int) -> Preempted:
    """The exit of a run stopped (and saved) at `step`."""
    name = signal.Signals(self.signal).name
    return Preempted(f"{name}: saved a checkpoint at step {step}; run the same command to resume", self.signal)

  def restore(self):
    for s, previous in self._previous.items():
      signal.signal(s, previous)
