"""The trainer's config fields and their Gemma Scope defaults (RECIPE §2).

Config files in `configs/` start from `train_config()` and override what they need; every
field is documented here.
"""

from __future__ import annotations

import ml_collections

from scope_jax.train.sweep import Recipe, make_groups


def train_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                         # init and shuffle; every random choice derives from it
  c.site = ml_collections.FieldReference(None, field_type=str)  # e.g. "res.6" (export metadata)
  c.model = ml_collections.FieldReference(None, field_type=str)  # model source (export metadata)

  c.data = ml_collections.ConfigDict()
  c.data.path = ml_collections.FieldReference(None, field_type=str)  # activations: a .npy [rows, d]
  c.data.width = ml_collections.FieldReference(None, field_type=int)  # expected d; checked against the data
  c.data.normalize = True            # divide by C so that E||x||^2 = 1 (RECIPE §3)
  c.data.context_size = ml_collections.FieldReference(None, field_type=int)  # export metadata
  c.data.dataset = ml_collections.FieldReference(None, field_type=str)       # export metadata

  c.sweep = ml_collections.ConfigDict()
  c.sweep.widths = [16_384]          # one stacked group per width
  c.sweep.l1_coefficients = [6e-4]   # λ values; every width trains every λ
  c.sweep.seeds = [0]                # init seeds; every (width, λ) trains every seed

  c.recipe = ml_collections.ConfigDict({f.name: f.default for f in Recipe.__dataclass_fields__.values()})
  c.recipe.target_l0 = ml_collections.FieldReference(None, field_type=float)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 4_096
  c.train.steps = 100_000
  c.train.microbatches = 1           # >1: accumulate gradients over batch slices (less memory)
  c.train.log_every = 100
  c.train.checkpoint_every = 1_000
  c.train.keep_checkpoints = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                   # -1: whatever `model` leaves
  c.mesh.model = 0                   # 0: Gemma Scope's rule of thumb (see parallel.mesh.sae_model_axis)

  c.export = ml_collections.ConfigDict()
  c.export.batches = 16              # batches after training on which L0 and densities are measured
  return c


def recipe_from(config: ml_collections.ConfigDict) -> Recipe:
  return Recipe(**config.recipe.to_dict())


def groups_from(config: ml_collections.ConfigDict):
  s = config.sweep
  return make_groups(list(s.widths), list(s.l1_coefficients), list(s.seeds))


def parse_arg(arg: str | None, **defaults):
  """big_vision-style config arguments: `"runlocal,widths=1024+2048,steps=500"` -> ConfigDict.

  Each key must be one of `defaults`; values take the default's type (lists split on `+`,
  a bare key sets a boolean). Unknown keys are an error naming the allowed ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r}: expected one of {sorted(defaults)}")
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, (list, tuple)):
      kind = type(default[0]) if default else str
      out[key] = [kind(v) for v in value.split("+")]
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out
