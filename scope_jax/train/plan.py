"""What a job needs on a target slice it does not run on: memory from its real step, compiled for
the slice on fake devices (never executed), and FLOPs, step time and device-hours.

- **Memory per device** is `compiled.memory_analysis()` of the job's own jitted step at its real
  shapes (every SAE of the sweep, the target's mesh, the tiling the target's memory gives):
  arguments + outputs + temporaries − donated buffers. It is the CPU compiler's figure: the
  accelerator compilers fuse and schedule differently, and XLA's own buffers, the loader's
  batches in flight and fragmentation are not in it (the trainer's check before allocating,
  train/memory.py, counts the batches).
- **FLOPs per step** follow the convention Gemma Scope's MFU was stated in: 12·B·d·M per SAE
  (10·B·d·M where the tiling keeps the pre-activations; a transcoder's d is d_in for the encoder's
  two matmuls and d_out for the other three). XLA's `cost_analysis()` counts a loop body once, and
  the step loops over SAEs and blocks, so its total is not used here; on one SAE in one block it
  agrees with the formula (tests/train/test_plan.py).
- **Step time** is FLOPs over the slice's peak (bfloat16 tensor cores, or true float32 for
  `precision = float32`), and at Gemma Scope's 50.8% MFU; device-hours are that times the job's
  steps and chips. Data loading, checkpoints and evaluation are left out.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scope_jax.core.kinds import config_target_site, kind_named
from scope_jax.data.batch import Batch
from scope_jax.models.config import PRESETS, GemmaConfig
from scope_jax.models.sites import parse_site, site_width
from scope_jax.parallel.devices import Target
from scope_jax.parallel.mesh import DATA, make_mesh, sae_model_axis
from scope_jax.train import stacked
from scope_jax.train.memory import need_per_device
from scope_jax.train.run import build

GEMMA_SCOPE_MFU = 0.508  # 131K-wide SAE, 8 TPUv3 chips, 45 ms per 4,096-token batch (docs/recipe.md §6)


class PlanError(ValueError):
  """A job that cannot be planned on the target: the message says why, for its row."""


@dataclasses.dataclass(frozen=True)
class TrainCost:
  mesh: dict[str, int]
  bytes_per_device: int
  device_bytes: int
  tiling: str
  flops_per_step: float
  step_s_at_peak: float
  steps: int

  @property
  def fits(self) -> bool:
    return self.bytes_per_device <= self.device_bytes

  @property
  def step_s_at_gemma_scope_mfu(self) -> float:
    return self.step_s_at_peak / GEMMA_SCOPE_MFU

  def device_hours(self, chips: int) -> float:
    return self.steps * self.step_s_at_gemma_scope_mfu * chips / 3600


def model_config(config: ml_collections.ConfigDict) -> GemmaConfig:
  """The architecture of `config.model` without loading weights: a preset named like it
  (`gemma-2-9b`, `/ckpt/gemma-2-9b` -> gemma2-9b) or an HF directory's config.json."""
  from scope_jax.models.checkpoints import read_hf_config

  if os.path.isfile(os.path.join(str(config.model), "config.json")):
    return read_hf_config(str(config.model))
  key = os.path.basename(str(config.model).rstrip("/")).lower().replace("-", "").replace("_", "")
  for name, preset in PRESETS.items():
    if name.replace("-", "") == key:
      return preset
  raise PlanError(f"model {config.model!r}: not a preset ({', '.join(PRESETS)}) nor an HF directory with config.json")


def train_flops(config: ml_collections.ConfigDict, d_in: int, d_out: int, keep_pre: bool) -> float:
  """FLOPs of one step of every SAE of the job (the module docstring's convention)."""
  latents = sum(len(g.members) * g.width for g in stacked.groups_from(config))
  encoder = (2 if keep_pre else 3) * d_in  # pre-activations (again in pass 2), ∂W_enc
  return 2.0 * config.train.batch_size * latents * (encoder + 3 * d_out)  # decoder, ∂f, ∂W_dec


def train_cost(config: ml_collections.ConfigDict, target: Target) -> TrainCost:
  """A trainer job's cost on `target`, from its step compiled for the target's chips (this process
  needs that many devices: the CLI starts with fake CPU devices for a `--target`)."""
  lm = model_config(config)
  d_in = site_width(parse_site(config.site, lm), lm)
  d_out = output_width(config, lm, d_in)
  chips, batch = target.chips, config.train.batch_size
  if len(jax.devices()) < chips:
    raise PlanError(f"{target.name} has {chips} chips; this process has {len(jax.devices())} devices")
  widths = list(config.sweep.widths)
  model = config.mesh.model or sae_model_axis(chips, widths)
  if chips % model or any(w % model for w in widths):
    raise PlanError(f"mesh.model {model} does not divide the {chips} chips of {target.name} and every width {widths}")
  data = chips // model if config.mesh.data == -1 else config.mesh.data
  if data * model != chips or batch % data:
    raise PlanError(
      f"mesh {data}×{model} with train.batch_size {batch} does not fit the {chips} chips of {target.name}"
    )
  mesh = make_mesh(data, model, jax.devices()[:chips])
  sweep = stacked.sweep_from(config)
  groups = sweep.groups
  need = need_per_device(groups, d_in, d_out, batch, mesh, sweep.kind.skip)
  free = target.kind.memory_bytes - (need.params + need.adam + need.batches)
  built = build(sweep, mesh, np.zeros(d_out, np.float32), d_in, free_bytes=max(free, 1))
  step_fn = built.make_step((), quiet=True)
  rows = lambda width: jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=NamedSharding(mesh, P(DATA, None)))
  batch_shapes = Batch(rows(d_in), rows(d_out) if sweep.kind.transcoder else None)
  state_shapes = stacked.abstract_state(built.init, built.shardings)
  memory = step_fn.lower(state_shapes, batch_shapes).compile().memory_analysis()
  per_device = (
    memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - memory.alias_size_in_bytes
  )
  tilings = [stacked.group_tiling(mesh, g, batch, config.train.latent_block, False, max(free, 1)) for g in groups]
  keep_pre = all(t.keep_pre for t in tilings)
  blocks = sum(stacked.width_local(mesh, g.width) // t.block for g, t in zip(groups, tilings))
  flops = train_flops(config, d_in, d_out, keep_pre)
  peak = target.kind.bf16_flops if config.precision == "bfloat16" else target.kind.f32_flops
  return TrainCost(
    mesh=dict(mesh.shape),
    bytes_per_device=int(per_device),
    device_bytes=target.kind.memory_bytes,
    tiling=f"{blocks} block{'s' if blocks > 1 else ''}" + (", pre kept" if keep_pre else ""),
    flops_per_step=flops,
    step_s_at_peak=flops / (chips * peak),
    steps=config.train.steps,
  )


def train_feed(config: ml_collections.ConfigDict, target: Target, precision: str) -> tuple[float, int]:
  """(rows per second, bytes per row) a trainer job consumes on `target` at Gemma Scope's MFU with
  `precision`'s peak (the pre-activations kept, as the accelerator tiling does where they fit):
  what its loaders must deliver, over all of the slice's hosts together, as float32."""
  lm = model_config(config)
  d_in = site_width(parse_site(config.site, lm), lm)
  d_out = output_width(config, lm, d_in)
  peak = target.kind.bf16_flops if precision == "bfloat16" else target.kind.f32_flops
  step_s = train_flops(config, d_in, d_out, keep_pre=True) / (target.chips * peak * GEMMA_SCOPE_MFU)
  return config.train.batch_size / step_s, 4 * (d_in + (d_out if kind_named(config.kind).transcoder else 0))


def output_width(config: ml_collections.ConfigDict, lm: GemmaConfig, d_in: int) -> int:
  """d_out: the width of what the config's dictionaries reconstruct (a transcoder's target site's)."""
  if not kind_named(config.kind).transcoder:
    return d_in
  site = config_target_site(config)
  if site is None:
    raise PlanError(f"{config.kind} at {config.site}: no target site (set target_site)")
  return site_width(parse_site(site, lm), lm)


def forward_flops_per_token(lm: GemmaConfig, layers: int) -> float:
  """2 FLOPs per weight of the first `layers` blocks (attention over the context left out)."""
  attn = lm.d_model * lm.head_dim * (2 * lm.n_heads + 2 * lm.n_kv_heads)
  return 2.0 * layers * (attn + 3 * lm.d_model * lm.d_ff)


@dataclasses.dataclass(frozen=True)
class ExtractCost:
  store_bytes: int
  write_bytes_per_s: float  # at the forward's speed at Gemma Scope's MFU on the whole slice
  device_hours: float


def extract_cost(config: ml_collections.ConfigDict, target: Target) -> ExtractCost:
  lm = model_config(config)
  sites = [parse_site(s, lm) for s in config.sites]
  item = 2 if config.extract.dtype == "bfloat16" else 4
  row_bytes = item * sum(site_width(s, lm) for s in sites)
  tokens = config.extract.tokens
  flops = forward_flops_per_token(lm, 1 + max(s.layer for s in sites))
  tokens_per_s = target.chips * target.kind.bf16_flops * GEMMA_SCOPE_MFU / flops
  return ExtractCost(tokens * row_bytes, tokens_per_s * row_bytes, tokens / tokens_per_s * target.chips / 3600)
