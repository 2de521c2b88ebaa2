"""Gemma Scope on Gemma 2: the sites, widths, token budgets and λ range of the release (docs/recipe.md §2).

The whole release of one size, as a sweep (scope_jax/grid.py):

    scope-jax sweep --config configs/gemma2.py:size=2b,model=/ckpt/gemma-2-2b --workdir runs/2b --dry_run

One site, stage by stage:

    scope-jax extract --config configs/gemma2.py:size=2b,layer=12,kind=res,model=/ckpt/gemma-2-2b \\
        --workdir runs/2b-res12 --config.extract.store=gs://bucket/acts/2b-res12
    scope-jax train   --config configs/gemma2.py:size=2b,layer=12,kind=res,model=/ckpt/gemma-2-2b \\
        --workdir runs/2b-res12 --config.extract.store=gs://bucket/acts/2b-res12

Arguments: size (2b | 9b | 27b), layer and kind (the site of the single-site commands), model
(HF dir or google-deepmind checkpoint), widths (single site; default: the release's widths),
runlocal (a tiny budget, narrow SAEs and a grid of one layer's res and mlp sites, plus 2B's
transcoder, so a whole sweep runs on a CPU in minutes).

The grid: 2B and 9B have res, mlp and att SAEs at every layer with widths 16.4K and 65.5K
(2B) or 131K (9B); three res layers per size have every width 2^14 … 2^20. 27B has res SAEs of
width 131K at layers 10, 22 and 34. 2B also has the transcoder suite (the report's Appendix B):
a transcoder mlp_in.L -> mlp.L of width 16.4K at every layer, read from the layer's store.
Token budgets: 4B tokens for 16.4K-wide SAEs and transcoders, 8B for the middle widths, 16B
for 1M; a store holds the largest budget its sites need and smaller budgets train on a part of
it. λ: published examples are 6e-4 (L0 ≈ 50 on 9B layer 20) and 1e-3; the
default range brackets them. Sequence length for training was not published; 1,024 (the
evaluation length) is used.
"""

from scope_jax.config import default_config, parse_arg
from scope_jax.grid import width_tokens

ALL_WIDTHS = tuple(2**k for k in range(14, 21))
RELEASES = {
  # size: (layers, kinds, layers of the grid, widths at every site, layers with ALL_WIDTHS at res)
  "2b": (26, ("res", "mlp", "att"), tuple(range(26)), (16_384, 65_536), (5, 12, 19)),
  "9b": (42, ("res", "mlp", "att"), tuple(range(42)), (16_384, 131_072), (9, 20, 31)),
  "27b": (46, ("res",), (10, 22, 34), (131_072,), ()),
}
TRANSCODERS = {"2b": (("transcoder",), (16_384,))}  # size: (kinds, widths) at every layer of the grid
TOKENS_BY_WIDTH = ((16_384, 4_000_000_000), (524_288, 8_000_000_000), (1_048_576, 16_000_000_000))
LAMBDAS = (2e-4, 4e-4, 6e-4, 1e-3, 2e-3)


def get_config(arg=None):
  arg = parse_arg(arg, size="2b", layer=12, kind="res", model="", widths=[0], runlocal=False)
  if arg.size not in RELEASES:
    raise ValueError(f"size {arg.size!r}: expected one of {sorted(RELEASES)}")
  n_layers, kinds, grid_layers, grid_widths, wide_layers = RELEASES[arg.size]
  if not 0 <= arg.layer < n_layers:
    raise ValueError(f"layer {arg.layer}: Gemma 2 {arg.size} has layers 0..{n_layers - 1}")
  site = f"{arg.kind}.{arg.layer}"
  c = default_config()
  c.model = arg.model or f"gemma-2-{arg.size}"
  c.sites, c.site = (site,), site
  c.data.text = ("hf:allenai/c4:en:train",)  # any large English corpus; Gemma Scope's was not released
  c.data.holdout_every = 1_000
  c.extract.seq_len = 1_024
  c.extract.batch_size = 64
  c.extract.bucket_rows = 2**20
  c.sweep.widths = tuple(w for w in arg.widths if w) or (ALL_WIDTHS if arg.layer in wide_layers else grid_widths)
  c.sweep.l1_coefficients = LAMBDAS
  c.grid.layers, c.grid.kinds, c.grid.widths = grid_layers, kinds, grid_widths
  c.grid.site_widths = tuple((f"res.{layer}", ALL_WIDTHS) for layer in wide_layers)
  c.grid.transcoders, c.grid.transcoder_widths = TRANSCODERS.get(arg.size, ((), ()))
  c.grid.tokens_by_width = TOKENS_BY_WIDTH
  c.extract.tokens = max(width_tokens(c, w) for w in c.sweep.widths)
  c.train.batch_size = 4_096
  c.train.steps = c.extract.tokens // c.train.batch_size
  c.eval.sequences, c.eval.seq_len = 2_048, 1_024
  if arg.runlocal:
    c.data.text = ("builtin:python-docs",)
    c.data.holdout_every = 8
    c.extract.seq_len, c.extract.batch_size, c.extract.tokens = 128, 8, 51_200
    c.extract.bucket_rows, c.extract.chunk_rows = 16_384, 512
    c.sweep.widths, c.sweep.l1_coefficients = (1_024, 2_048), (1e-3, 1e-2)
    c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 512, 100, 20, 50
    c.recipe.lr, c.recipe.lr_warmup_steps, c.recipe.sparsity_warmup_steps = 2e-3, 10, 50
    c.eval.sequences, c.eval.seq_len, c.eval.batch_size = 8, 128, 8
    c.grid.layers, c.grid.kinds, c.grid.widths, c.grid.site_widths = (arg.layer,), ("res", "mlp"), (1_024, 2_048), ()
    c.grid.transcoder_widths = (1_024,) if c.grid.transcoders else ()
    c.grid.tokens_by_width = ()  # every width: extract.tokens (100 steps of 512)
  return c
