"""A CLT sweep's run: its data (every MLP input and output of the layer range, one store), the
stacked step of train/clt.py, and the checkpoints, metrics, preemption and resumption the SAE
trainer has (train/checkpoints.py, train/health.py): a resumed run is bit-identical, since a
batch is a pure function of (seed, step).

    state = train_clt(config, workdir)            # config.kind == "clt"
    state, sweep, source = restore_clt(config, workdir)   # export: the latest checkpoint
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from scope_jax.core.kinds import clt_layers, clt_sites
from scope_jax.data.source import LayerStackSource
from scope_jax.parallel.dispatch import settle
from scope_jax.parallel.mesh import make_mesh
from scope_jax.train import checkpoints
from scope_jax.train.checkpoints import Checkpointer, Preemption, restore_or_init
from scope_jax.train.clt import CLTSweep, initializer, make_step
from scope_jax.train.health import MetricWriter, check_finite
from scope_jax.train.run import site_opener
from scope_jax.train.stacked import recipe_from


def clt_sweep_from(config: ml_collections.ConfigDict) -> CLTSweep:
  """The config's CLTs: one per (λ, seed); the sparse step with `train.capacity` slots per row and
  layer when `train.step` is not 'dense' and a capacity is set."""
  t, s = config.train, config.sweep
  members = tuple((float(lam), int(seed)) for lam in s.l1_coefficients for seed in s.seeds)
  capacity = t.capacity if t.step != "dense" else 0
  layers = len(clt_layers(config))
  return CLTSweep(layers, int(s.widths[0]), members, recipe_from(config), t.batch_size, t.steps, capacity)


def open_clt_source(config: ml_collections.ConfigDict, workdir: str | Path, mesh=None) -> LayerStackSource:
  """Every `mlp_in.L` and `mlp.L` of the range from the store (`data.path`, else extraction's),
  each a loader of its own read with the same seed, so the rows line up."""
  from scope_jax.activations.extract import store_root
  from scope_jax.activations.store import open_store

  path = config.data.path or store_root(config, workdir)
  if Path(path).suffix == ".npy":
    raise ValueError(f"data.path {path}: a CLT trains on a store holding every layer's mlp_in and mlp, not a .npy file")
  inputs, targets = clt_sites(clt_layers(config))
  store = open_store(path)
  if missing := [site for site in inputs + targets if site not in store.sites]:
    raise ValueError(
      f"store {path}: the CLT of layers {config.clt.first_layer}-{config.clt.last_layer} needs sites {missing}, "
      f"which it does not hold (it holds {sorted(store.sites)}); extract them (config.sites) or change clt.*_layer"
    )
  open_site = site_opener(config, path, mesh or make_mesh(data=config.mesh.data, model=config.mesh.model or 1))
  opened = []
  try:
    for site in inputs + targets:
      opened.append(open_site(site))
    return LayerStackSource(opened[: len(inputs)], opened[len(inputs) :])
  except BaseException:
    for source in opened:
      source.close()
    raise


def _identity(config: ml_collections.ConfigDict, source: LayerStackSource) -> dict:
  return checkpoints.run_identity(config, source) | {"clt": config.clt.to_dict()}


def _open(config, workdir, source):
  sweep = clt_sweep_from(config)
  owns = source is None
  source = source or open_clt_source(config, workdir)
  try:
    if source.layers != sweep.layers:
      raise ValueError(f"the source holds {source.layers} layers; the CLT of config.clt has {sweep.layers}")
    init, shardings = initializer(sweep, source.mesh, source.output_mean, source.input_width)
    manager = checkpoints.checkpoint_manager(Path(workdir), config)
  except BaseException:
    if owns:
      source.close()
    raise
  return sweep, source, owns, init, shardings, manager


def restore_clt(config: ml_collections.ConfigDict, workdir: str | Path, source: LayerStackSource | None = None):
  """(state, sweep, source) of the latest checkpoint (another run's refused, a damaged one set
  aside, as for SAEs); the caller closes the source."""
  sweep, source, _, init, shardings, manager = _open(config, workdir, source)
  try:
    if manager.latest_step() is None:
      raise FileNotFoundError(f"{Path(workdir) / 'checkpoints'}: no checkpoint to export; run `scope-jax train` first")
    state = restore_or_init(manager, _identity(config, source), init, shardings)
  except BaseException:
    source.close()
    raise
  finally:
    manager.close()
  return state, sweep, source


def _metrics(sweep: CLTSweep, stats: dict) -> dict[str, dict[str, float]]:
  host = jax.tree.map(np.asarray, stats)
  out = {}
  for i, name in enumerate(sweep.names):
    out[name] = {
      "loss": float(host["loss"][i]),
      "fvu": float(np.mean(host["fvu_l"][i])),
      "l0": float(np.sum(host["l0_l"][i])),
      "sparse_fraction": float(host["sparse"][i]),
    } | {f"fvu_layer{j}": float(v) for j, v in enumerate(host["fvu_l"][i])}
    out[name] |= {f"l0_layer{j}": float(v) for j, v in enumerate(host["l0_l"][i])}
  return out


def train_clt(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  source: LayerStackSource | None = None,
  progress: bool = True,
) -> dict:
  """Trains the config's CLTs to `train.steps`, resuming from `workdir`; returns the final state."""
  workdir = Path(workdir)
  sweep, source, owns, init, shardings, manager = _open(config, workdir, source)
  groups = (sweep,)  # checkpoints and health ask for each group's `names`; one stack of CLTs is one group
  try:
    identity = _identity(config, source)
    state = restore_or_init(manager, identity, init, shardings)
    checkpointer = Checkpointer(manager, identity, groups, config.train.checkpoint_every)
    start, steps = int(state["step"]), config.train.steps
    if start > steps:
      raise ValueError(
        f"train.steps = {steps}, but {workdir / 'checkpoints'} holds a checkpoint of step {start}; "
        "set train.steps to at least that, or use another workdir"
      )
    writer = MetricWriter(workdir, start)
    step_fn = make_step(sweep, source.mesh)
  except BaseException:
    manager.close()
    if owns:
      source.close()
    raise
  if start:
    tqdm.write(f"train: resuming the CLTs from the checkpoint of step {start} in {workdir / 'checkpoints'}")
  preemption = Preemption()
  bar = tqdm(
    total=steps,
    initial=start,
    desc=f"train {len(sweep.members)} CLT{'s' * (len(sweep.members) > 1)} of {sweep.layers} layers × {sweep.width}",
    unit="step",
    disable=not progress or jax.process_index() != 0,
  )
  t0, done = time.perf_counter(), 0
  try:
    rows = source.batch(start) if start < steps else None
    for s in range(start, steps):
      state, stats = step_fn(state, *rows)
      manager.check_for_errors()
      if s + 1 < steps:
        rows = source.batch(s + 1)
      settle(state, source.mesh)
      done += 1
      if (s + 1) % config.train.log_every == 0 or s + 1 == steps:
        values = _metrics(sweep, stats)
        writer.write(s + 1, values)
        check_finite(state, groups, checkpointer.latest)
        first = values[sweep.names[0]]
        rate = done * source.batch_size / (time.perf_counter() - t0)
        bar.set_postfix_str(f"{rate:,.0f} tok/s, L0 {first['l0']:.1f} (all layers), FVU {first['fvu']:.3f}")
      bar.update(1)
      if checkpointer.on_schedule(s + 1, steps):
        checkpointer.save(s + 1, state, {})
      if preemption.reached(s + 1):
        checkpointer.finish(s + 1, state, {})
        raise preemption.stopped(s + 1)
    if start < steps:
      checkpointer.finish(steps, state, {})
    manager.wait_until_finished()
    multihost_utils.sync_global_devices("scope_jax train clt: checkpoints final")
  finally:
    preemption.restore()
    bar.close()
    writer.close()
    manager.close()
    if owns:
      source.close()
  return state
