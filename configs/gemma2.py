"""Gemma Scope on Gemma 2: the sites, widths, token budgets and λ range of the release (RECIPE §2).

    scope-jax extract --config configs/gemma2.py:size=2b,layer=12,kind=res,model=/ckpt/gemma-2-2b \\
        --workdir gs://bucket/runs/2b-res12 --config.extract.store=gs://bucket/acts/2b-res12
    scope-jax train   --config configs/gemma2.py:size=2b,layer=12,kind=res,model=/ckpt/gemma-2-2b --workdir ...

Arguments: size (2b | 9b | 27b), layer, kind (res | mlp | att), model (HF dir or google-deepmind
checkpoint), widths (default: the release's widths for that size), runlocal (a tiny budget and
narrow SAEs so the whole job runs on a CPU in minutes).

Token budgets: 4B tokens for 16.4K-wide SAEs, 8B for wider ones; one extraction serves every
width, so the store holds the larger budget. λ: published examples are 6e-4 (L0 ≈ 50 on 9B
layer 20) and 1e-3; the default range brackets them. Sequence length for training was not
published; 1,024 (the evaluation length) is used.
"""

from scope_jax.config import default_config, parse_arg

RELEASES = {
    # size: (layers, widths trained on every released site, layers released for 27B)
    "2b": (26, (16_384, 65_536)),
    "9b": (42, (16_384, 131_072)),
    "27b": (46, (131_072,)),
}
LAMBDAS = (2e-4, 4e-4, 6e-4, 1e-3, 2e-3)


def get_config(arg=None):
  arg = parse_arg(arg, size="2b", layer=12, kind="res", model="", widths=[0], runlocal=False)
  if arg.size not in RELEASES:
    raise ValueError(f"size {arg.size!r}: expected one of {sorted(RELEASES)}")
  layers, widths = RELEASES[arg.size]
  if not 0 <= arg.layer < layers:
    raise ValueError(f"layer {arg.layer}: Gemma 2 {arg.size} has layers 0..{layers - 1}")
  widths = tuple(w for w in arg.widths if w) or widths
  site = f"{arg.kind}.{arg.layer}"
  c = default_config()
  c.model = arg.model or f"gemma-2-{arg.size}"
  c.sites, c.site = (site,), site
  c.data.text = ("hf:allenai/c4:en:train",)  # any large English corpus; Gemma Scope's was not released
  c.data.holdout_every = 1_000
  c.extract.seq_len = 1_024
  c.extract.batch_size = 64
  c.extract.tokens = 8_000_000_000 if max(widths) > 16_384 else 4_000_000_000
  c.extract.bucket_rows = 2**20
  c.sweep.widths = widths
  c.sweep.l1_coefficients = LAMBDAS
  c.train.batch_size = 4_096
  c.train.steps = c.extract.tokens // c.train.batch_size
  c.eval.sequences, c.eval.seq_len = 2_048, 1_024
  if arg.runlocal:
    c.data.text = ("builtin:python-docs",)
    c.data.holdout_every = 8
    c.extract.seq_len, c.extract.batch_size, c.extract.tokens = 128, 8, 20_000
    c.extract.bucket_rows, c.extract.chunk_rows = 16_384, 512
    c.sweep.widths, c.sweep.l1_coefficients = (1_024, 2_048), (1e-3, 1e-2)
    c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 512, 100, 20, 50
    c.recipe.lr, c.recipe.lr_warmup_steps, c.recipe.sparsity_warmup_steps = 2e-3, 10, 50
    c.eval.sequences, c.eval.seq_len, c.eval.batch_size = 8, 128, 8
  return c
