"""The local run: Gemma 3 270M (embedded), text every Python installation carries (the Python
documentation and the standard library's docstrings), res.6, six JumpReLU SAEs that a 2-core
machine trains to a usable quality in about 14 minutes end to end (AMD EPYC, 2 cores; benchmarks/README.md).

    scope-jax run --config configs/local.py --workdir runs/local

Arguments (`configs/local.py:tokens=20000,steps=300`): tokens (extraction budget, 0 = all the
text), steps, widths, l1, site, kind, finetune (KL-finetune every SAE after export: `run` takes
about 25 minutes longer). Warm-ups and the decay scale with `steps`. Every choice below
was measured: docs/local_recipe.md.

`kind=transcoder` (or `skip_transcoder`) trains MLP transcoders of layer 6 instead (input
mlp_in.6, target mlp.6, both extracted by one forward); `kind=matryoshka` trains Matryoshka SAEs
at res.6 with nested prefixes of 128 and 512 latents; `kind=topk` and `kind=batchtopk` train
TopK and BatchTopK SAEs with AuxK (train/topk.py) at k = 25, 50, 100 (`k=...`), near the L0 of
the JumpReLU grid, the same recipe otherwise (the dead-latent loss is JumpReLU's: AuxK takes its place).
"""

from scope_jax.config import default_config, parse_arg
from scope_jax.core.kinds import TRANSCODER_KINDS, clt_sites, transcoder_sites


def get_config(arg=None):
  raw = arg
  widths, l1, k = [1_024, 2_048], [2e-4, 4.5e-4, 1e-3], [25, 50, 100]
  arg = parse_arg(
    arg, tokens=0, steps=2_000, widths=widths, l1=l1, k=k, site="res.6", kind="sae", layers="0-17", finetune=False
  )
  c = default_config()
  c.model = "gemma3-270m"
  c.sites = (arg.site,)
  c.site = arg.site
  if arg.kind in TRANSCODER_KINDS:
    c.kind, (c.site, c.target_site) = arg.kind, transcoder_sites(arg.site.split(".")[1])
    c.sites = (c.site, c.target_site)
  elif arg.kind == "matryoshka":
    c.sweep.prefixes = (128, 512)
  elif arg.kind in ("topk", "batchtopk"):
    c.sweep.activation, c.sweep.k = arg.kind, tuple(arg.k)
  elif arg.kind == "clt":
    first, _, last = arg.layers.partition("-")
    c.kind, c.clt.first_layer, c.clt.last_layer = "clt", int(first), int(last or first)
    inputs, targets = clt_sites(range(c.clt.first_layer, c.clt.last_layer + 1))
    c.sites = tuple(site for pair in zip(inputs, targets) for site in pair)  # as the suite's grid orders them
    c.site = inputs[0]
  elif arg.kind != "sae":
    raise ValueError(
      f"configs/local.py kind={arg.kind!r}: expected sae, transcoder, skip_transcoder, matryoshka, topk, "
      "batchtopk or clt"
    )
  c.data.text = (
    "builtin:python-docs",
    "builtin:python-docstrings",
  )  # 475K tokens of technical English after the holdout
  c.data.holdout_every = 8  # every 8th document is evaluation text, never extracted
  c.extract.seq_len = 128
  c.extract.batch_size = 8
  c.extract.tokens = arg.tokens
  c.extract.bucket_rows = 65_536
  c.extract.chunk_rows = 1_024
  c.sweep.widths = tuple(arg.widths)
  c.sweep.l1_coefficients = tuple(arg.l1)
  c.train.batch_size = 1_024
  c.train.steps = arg.steps
  c.train.log_every = 25
  c.train.checkpoint_every = 250
  c.recipe.normalize = "centred"  # b_dec starts at the mean; C measures what the SAE must explain
  c.recipe.lr = 7e-4  # 10x Gemma Scope's: 2,000 steps, not 100,000+
  c.recipe.lr_warmup_steps = arg.steps // 20
  c.recipe.sparsity_warmup_steps = arg.steps * 3 // 10
  c.recipe.lr_decay_steps = arg.steps * 3 // 10  # let the parameters settle at the end
  c.recipe.adam_b2 = 0.99  # Adam's memory: 100 steps, not half the run (gradients shrink ~3x early on)
  c.recipe.clip_grad_norm = 0.01  # below every step's norm: each step's gradient has the same norm
  c.recipe.dead_latent_loss = 0.0 if arg.kind in ("topk", "batchtopk") else 1e-2  # revive latents silent for
  # dead_window_steps (sae/loss.py); TopK and BatchTopK revive them with AuxK
  c.recipe.dead_window_steps = 100
  c.export.batches = 128  # L0 and dead latents measured on 131,072 rows
  c.eval.sequences = 64  # 64 × 128 tokens of held-out text: Δ loss's standard error ≈ 0.02-0.03
  c.eval.seq_len = 128
  c.eval.batch_size = 16
  c.eval.delta_loss_se = 0.05  # warn if the eval set is too small for this standard error
  c.eval.bfloat16 = False  # one float32 pass: a bfloat16 pass would add ~1½ minutes
  # Δ loss per domain: the held-out Python documentation (prose) and the standard library's code,
  # which is never trained on; and each SAE's weights in bfloat16, float8 and int8 (model float32)
  c.eval.domains = (("docs", "builtin:python-docs"), ("code", "builtin:python-stdlib"))
  c.eval.domain_sequences = 16  # one batch per domain: Δ loss ± ~0.02-0.04 (the main set's 64 decide the table)
  c.eval.quantize = ("bfloat16", "float8_e4m3", "int8")
  c.eval.quantize_sequences = 16
  # KL finetuning (scope-jax finetune, or `finetune` to make it a stage of `run`): 40 steps of 8 × 128
  # tokens, 2% of training's rows, about 4 minutes per SAE on 2 cores (benchmarks/README.md)
  c.finetune.enabled = arg.finetune
  c.finetune.tokens = 40 * 8 * 128
  c.finetune.batch_size, c.finetune.seq_len = 8, 128
  c.finetune.lr = 3e-4
  c.finetune.checkpoint_every = 10
  c.finetune.measure_batches = 32  # L0 and densities of the finetuned SAEs on 32,768 tokens
  c.finetune.log_every = 1
  if arg.kind == "clt":
    clt_sizes(c, given={item.partition("=")[0] for item in (raw or "").split(",")})
  return c


def clt_sizes(c, given: set[str]) -> None:
  """A CLT over all 18 layers (or `layers=A-B`) sized for 2 cores: 256 latents per layer, one
  epoch of 400K tokens (390 steps) stored in bfloat16 (36 sites: 18 GB), the dense step (the sparse one pays
  per slot what the dense one pays per latent only past ~50× sparsity: benchmarks/README.md)."""
  c.sweep.widths = c.sweep.widths[:1] if "widths" in given else (256,)
  c.sweep.l1_coefficients = c.sweep.l1_coefficients if "l1" in given else (4.5e-4, 1e-3)
  c.extract.tokens = c.extract.tokens or 400_000
  steps = c.train.steps if "steps" in given else c.extract.tokens // c.train.batch_size  # one epoch, as grid.py's
  c.train.steps = steps  # jobs train (the suite's transcoders: configs/transcoder_suite.py)
  c.recipe.lr_warmup_steps, c.recipe.sparsity_warmup_steps = steps // 20, steps * 3 // 10
  c.recipe.lr_decay_steps = steps * 3 // 10
  c.extract.dtype = "bfloat16"
  c.extract.bucket_rows = 16_384  # × 36 sites in memory while shuffling
  c.data.window_chunks = 4  # × 36 loaders
  c.train.step = "dense"
  c.eval.domains, c.eval.quantize = (), ()  # the replacement model is evaluated instead (eval/replacement.py)
  c.browse.enabled = False  # the browser shows one layer's latents; a CLT's span layers
