"""Train a sweep of JumpReLU SAEs on activations saved as a `.npy` array `[rows, d]`.

    scope-jax train --config configs/sweep_from_npy.py:path=acts.npy,widths=4096+8192 --workdir runs/a
    scope-jax export --config configs/sweep_from_npy.py:path=acts.npy,widths=4096+8192 --workdir runs/a

Arguments: path, site (for export metadata, e.g. res.6), widths, l1 (λ values), steps,
batch_size, runlocal (short warm-ups for a CPU smoke run). Everything else: the Gemma Scope
recipe (scope_jax/train/config.py); override any field with --config.FIELD=VALUE.
"""

from scope_jax.config import default_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, path="", site="", widths=[16_384], l1=[6e-4], steps=100_000, batch_size=4_096, runlocal=False)
  c = default_config()
  c.data.path = arg.path or None
  c.site = arg.site or None
  c.sweep.widths = tuple(arg.widths)
  c.sweep.l1_coefficients = tuple(arg.l1)
  c.train.steps = arg.steps
  c.train.batch_size = arg.batch_size
  if arg.runlocal:
    c.recipe.lr = 1e-3
    c.recipe.lr_warmup_steps = 20
    c.recipe.sparsity_warmup_steps = 100
    c.recipe.dead_window_steps = 100
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.export.batches = 4
  return c
