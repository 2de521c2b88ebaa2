"""A run assembled in one place: its mesh, its data, its sweep, the state and step built for them,
and its checkpoints. Training (`trainer.train`), the plan of a job on another slice
(`train/plan.py`) and the tests of the step all build through `build`; export restores a
checkpoint without it (`checkpoints.restore_latest`).

    run = open_run(config, workdir)    # or open_run(config, workdir, source=ArraySource(...))
    state = checkpoints.restore_or_init(run.checkpoints, run.identity, run.built.init, run.built.shardings)
    step_fn = run.built.make_step(())  # dense; per group, a capacity for the sparse step
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from scope_jax.core.kinds import config_target_site, kind_named
from scope_jax.data.source import BatchSource, PairedSource, open_source
from scope_jax.parallel.mesh import make_mesh, sae_model_axis
from scope_jax.train import checkpoints, stacked
from scope_jax.train.memory import check_fits


def make_train_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  model = config.mesh.model or sae_model_axis(jax.device_count(), list(config.sweep.widths))
  return make_mesh(data=config.mesh.data, model=model)


def site_opener(config: ml_collections.ConfigDict, path: str, mesh) -> Callable[..., BatchSource]:
  """`open_site(site, expected_width=None)`: a source of one site of `path` read as the config's
  `data.*`, `train.batch_size`, `seed` and normalization say (every site of a run alike, so that
  their rows pair up)."""
  normalize = config.recipe.normalize if config.data.normalize else None
  options = dict(
    window_chunks=config.data.window_chunks,
    streams=config.data.streams,
    nonfinite=config.data.nonfinite,
    workers=config.data.workers,
  )
  return lambda site, expected_width=None: open_source(
    path, config.train.batch_size, mesh, config.seed, normalize, site=site, expected_width=expected_width, **options
  )


def source_from_config(config: ml_collections.ConfigDict, workdir: str | Path, mesh) -> BatchSource:
  """`data.path` (a store or .npy), else the store `scope-jax extract` wrote for this config; for a
  transcoder, its input and target sites of that store read as pairs (data/source.py `PairedSource`)."""
  from scope_jax.activations.extract import store_root

  path = config.data.path or store_root(config, workdir)
  open_site = site_opener(config, path, mesh)
  kind = kind_named(config.kind)
  if not kind.transcoder:
    return open_site(config.site, config.data.width)
  if Path(path).suffix == ".npy":
    raise ValueError(f"data.path {path}: a {kind} trains on a store holding both its sites, not a .npy file")
  input_source = open_site(config.site, config.data.width)
  try:
    return PairedSource(input_source, open_site(config_target_site(config), None))
  except BaseException:
    input_source.close()
    raise


@dataclasses.dataclass(frozen=True)
class Built:
  """A sweep's jitted state initializer, the state's shardings, and its steps: `make_step(capacities)`
  is dense for `()`, else sparse for each group given a capacity (`stacked.make_train_step`)."""

  init: Callable[[], dict]
  shardings: dict
  make_step: Callable[..., Callable]


def build(
  sweep: stacked.Sweep, mesh: jax.sharding.Mesh, mean_d, d_in: int | None = None, free_bytes: int | None = None
) -> Built:
  """The state and steps of `sweep` on `mesh`; `mean_d` `[d_out]`: the mean of what is reconstructed
  (in training units: where `b_dec` starts); `d_in`: a transcoder's input width; `free_bytes`: the
  device memory the tiling is sized for (None: what the devices report, train/tiling.py)."""
  init, shardings = stacked.initializer(sweep, mesh, mean_d, d_in)
  mean_d = jnp.asarray(mean_d, jnp.float32)
  make_step = functools.partial(stacked.make_train_step, sweep, shardings, mesh, mean_d, free_bytes=free_bytes)
  return Built(init, shardings, make_step)


def starting_from(path: str, source: BatchSource, sweep: stacked.Sweep, built: Built) -> Callable[[], dict]:
  """`built.init` with every SAE of the sweep starting from the released SAE at `path` (any file
  `load_sae` reads), its normalization unfolded into this run's (the source's divisors); Adam,
  the schedules and the dead-latent counters start afresh (finetuning, as Gemma Scope 2's chat
  SAEs were made from the pretrained ones)."""
  from scope_jax.sae.io import kind_of, load_sae
  from scope_jax.sae.model import unfold
  from scope_jax.train.params import TrainParams

  sae, d_in, groups = load_sae(path), source.input_width, sweep.groups
  file_kind = kind_of(sae)
  expected = f"{sweep.kind} of width {sorted({g.width for g in groups})} and input width {d_in}"
  if file_kind != sweep.kind or any(g.width != sae.width for g in groups) or sae.d_in != d_in:
    raise ValueError(
      f"train.init_from {path}: a {file_kind} of width {sae.width} and input width {sae.d_in}; "
      f"this sweep trains a {expected}"
    )
  trained = TrainParams.from_sae(unfold(sae, *source.divisors))

  def init_from_file() -> dict:
    state = built.init()
    stack = lambda n: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), trained)
    params = tuple(jax.device_put(stack(len(g.members)), sh) for g, sh in zip(groups, built.shardings["params"]))
    return state | {"params": params}

  return init_from_file


@dataclasses.dataclass
class Run:
  """A run as training opens it: the sweep, the mesh, the data, what was built for them, the
  run's identity (what its checkpoints must match) and its checkpoints."""

  sweep: stacked.Sweep
  mesh: jax.sharding.Mesh
  source: BatchSource
  owns_source: bool  # opened here from the config (and so closed here)
  identity: dict
  built: Built
  checkpoints: ocp.CheckpointManager

  @property
  def groups(self) -> tuple[stacked.Group, ...]:
    return self.sweep.groups

  def close(self) -> None:
    self.checkpoints.close()
    if self.owns_source:
      self.source.close()  # the loader's prefetch threads


def open_run(config: ml_collections.ConfigDict, workdir: str | Path, source: BatchSource | None = None) -> Run:
  """The run of `config` in `workdir`, on `source` (default: the config's data), over the
  source's mesh: the batches arrive sharded on it, so the step must run on it too. Refuses,
  before anything is allocated, a source that does not match the config or a sweep that does not fit."""
  sweep = stacked.sweep_from(config)
  owns_source = source is None
  source = source or source_from_config(config, workdir, make_train_mesh(config))
  try:
    check_source(config, source)
    mesh, d_in, d_out = source.mesh, source.input_width, source.output_width
    check_fits(sweep.groups, d_in, d_out, sweep.batch_size, mesh, sweep.kind.skip)
    built = build(sweep, mesh, source.output_mean, d_in)
    if config.train.init_from:
      built = dataclasses.replace(built, init=starting_from(config.train.init_from, source, sweep, built))
    manager = checkpoints.checkpoint_manager(Path(workdir), config)
  except BaseException:
    if owns_source:
      source.close()
    raise
  return Run(sweep, mesh, source, owns_source, checkpoints.run_identity(config, source), built, manager)


def check_source(config: ml_collections.ConfigDict, source: BatchSource) -> None:
  if source.batch_size != config.train.batch_size:
    raise ValueError(f"source batch size {source.batch_size} differs from train.batch_size {config.train.batch_size}")
  if config.data.width is not None and source.input_width != config.data.width:  # .npy sources
    raise ValueError(
      f"data width {source.input_width} ({source.describe().get('name')}) differs from config.data.width "
      f"{config.data.width}"
    )
