"""The local run: Gemma 3 270M (embedded), the Python documentation corpus, res.6, a sweep of
SAEs small enough for a laptop CPU.

    scope-jax run --config configs/local.py --workdir runs/local

Arguments (`configs/local.py:tokens=20000,steps=300`): tokens (extraction budget, 0 = the
whole corpus), steps, widths, l1, site.
"""

from scope_jax.config import default_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, tokens=0, steps=400, widths=[1_024, 2_048], l1=[1e-3, 3e-3, 1e-2], site="res.6")
  c = default_config()
  c.model = "gemma3-270m"
  c.sites = (arg.site,)
  c.site = arg.site
  c.data.text = ("builtin:python-docs",)
  c.data.holdout_every = 8            # every 8th document is evaluation text, never extracted
  c.extract.seq_len = 128
  c.extract.batch_size = 8
  c.extract.tokens = arg.tokens
  c.extract.bucket_rows = 16_384
  c.extract.chunk_rows = 512
  c.sweep.widths = tuple(arg.widths)
  c.sweep.l1_coefficients = tuple(arg.l1)
  c.train.batch_size = 1_024
  c.train.steps = arg.steps
  c.train.log_every = 20
  c.train.checkpoint_every = 100
  c.recipe.lr = 2e-3                  # a 400-step run needs a faster start than Gemma Scope's 7e-5
  c.recipe.lr_warmup_steps = 30
  c.recipe.sparsity_warmup_steps = 150
  c.recipe.dead_window_steps = 200
  c.export.batches = 32
  c.eval.sequences = 16               # one batch of 16 × 128 tokens, in float32 and bfloat16
  c.eval.seq_len = 128
  c.eval.batch_size = 16
  return c
