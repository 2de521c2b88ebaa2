"""Every config field of the pipeline, with Gemma Scope defaults (docs/recipe.md §2).

Config files in `configs/` start from `default_config()` and override what they need; each
command reads its sections (extract: model, sites, data.text*, extract, model_mesh; train:
site, data, sweep, recipe, train, mesh; export: export). Every field is documented here.
"""

from __future__ import annotations

import ml_collections

from scope_jax.core.choices import (
  ACTIVATIONS,
  ALPHA_RULES,
  DTYPES,
  EXTRACT_BY,
  MODES,
  NONFINITE,
  NORMALIZATIONS,
  SCHEDULES,
  SPARSITY_LOSSES,
  SPARSITY_RULES,
  TRAIN_STEPS,
)
from scope_jax.core.kinds import KINDS, TRANSCODER_KINDS, config_target_site, topk_problem


def default_config() -> ml_collections.ConfigDict:
  """Sequences are tuples so that `--config.sites="('res.6','res.12')"` can override them."""
  from scope_jax.train.stacked import Recipe  # here: the trainer imports this module's helpers

  c = ml_collections.ConfigDict()
  c.seed = 0  # init, shuffles, buckets: every random choice derives from it
  c.model = "gemma3-270m"  # HF dir, .gguf, google-deepmind checkpoint or embedded name
  c.model_dtype = "float32"  # forward dtype: float32 | bfloat16
  c.precision = "float32"  # every matmul of the training step, the model and the eval engine: float32 (true
  # float32 on every backend, as Gemma Scope) | bfloat16 (bfloat16 operands, float32 sums: the tensor-core
  # path); never the backend's default (scope_jax/parallel/precision.py)
  c.sites = ("res.6",)  # extract: every site written by one forward
  c.site = ml_collections.FieldReference(None, field_type=str)  # train/export: the site to train on
  c.kind = "sae"  # sae | transcoder | skip_transcoder (docs/recipe.md §4): a transcoder reads `site`
  # (an MLP input, mlp_in.L) and predicts `target_site`
  c.target_site = ml_collections.FieldReference(None, field_type=str)  # a transcoder's target, a site of
  # the same layer in the same store; unset = mlp.L for site mlp_in.L
  c.clt = ml_collections.ConfigDict()  # kind = "clt" (docs/recipe.md §14): encoders at mlp_in.L and decoders
  c.clt.first_layer = 0  # to mlp.L' (L' >= L) for every layer L of first_layer … last_layer; the store must
  c.clt.last_layer = 0  # hold both sites of each. sweep.widths: its one width (latents per layer)

  c.data = ml_collections.ConfigDict()
  c.data.text = ("builtin:python-docs",)  # text sources (scope_jax/text/sources.py)
  c.data.text_field = "text"  # field of .jsonl / .parquet / HF records
  c.data.holdout_every = 0  # >0: documents with id % holdout_every == 0 are kept out (eval text)
  c.data.path = ml_collections.FieldReference(None, field_type=str)  # train on: a store root or a .npy [rows, d];
  # unset = the extract store
  c.data.width = ml_collections.FieldReference(None, field_type=int)  # expected d; checked against the data
  c.data.window_chunks = 16  # loader shuffle window, in store chunks (scope_jax/data/loader.py)
  c.data.streams = 0  # the loader's disjoint read streams; 0 = one per process. Fix it (to a
  # multiple of every process count you use) and batches do not depend
  # on the process count: a job can resume on another slice size
  c.data.workers = 0  # threads gathering, scaling and checking each batch; 0 = the host's cores (same bytes)
  c.data.nonfinite = "error"  # rows with NaN/Inf in the store: error | skip (counted)
  c.data.normalize = True  # divide by C so that E||x||^2 = 1 (docs/recipe.md §3)
  c.data.context_size = ml_collections.FieldReference(None, field_type=int)  # export metadata
  c.data.dataset = ml_collections.FieldReference(None, field_type=str)  # export metadata

  c.sweep = ml_collections.ConfigDict()
  c.sweep.widths = (16_384,)  # one stacked group per width
  c.sweep.l1_coefficients = (6e-4,)  # λ values; every width trains every λ
  c.sweep.seeds = (0,)  # init seeds; every (width, λ) trains every seed
  c.sweep.prefixes = ()  # Matryoshka: nested prefix sizes, increasing, each at most the narrowest
  # width (the width itself is always the last prefix); () = plain SAEs
  c.sweep.activation = "jumprelu"  # jumprelu (Gemma Scope) | topk (k latents per token) | batchtopk (k per
  # token on average over the batch, released as a JumpReLU); train/topk.py
  c.sweep.k = ()  # topk, batchtopk: the k values; every width trains every k (sweep.l1_coefficients is unused)

  c.recipe = ml_collections.ConfigDict({f.name: f.default for f in Recipe.__dataclass_fields__.values()})
  c.recipe.target_l0 = ml_collections.FieldReference(None, field_type=float)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 4_096
  c.train.steps = 100_000
  c.train.latent_block = 0  # latents per block of the blocked step; 0 = automatic (temporaries
  # by the device: cache-sized on CPU, memory-sized on GPU and TPU, train/tiling.py)
  c.train.step = "auto"  # dense | sparse | auto: the sparse step once it is measured faster
  # (train/sparse.py, train/selection.py)
  c.train.capacity = 0  # the sparse step's slots per token; more in a step runs the dense step
  # instead; 0 = automatic, from the slots observed
  c.train.init_from = ""  # start every SAE of the sweep from this file (ours, Gemma Scope 1/2,
  # SAELens; its released normalization unfolded into this store's) instead of a fresh init
  c.train.log_every = 100
  c.train.checkpoint_every = 1_000
  c.train.keep_checkpoints = 3

  c.mesh = ml_collections.ConfigDict()  # the trainer's mesh
  c.mesh.data = -1  # -1: whatever `model` leaves
  c.mesh.model = 0  # 0: Gemma Scope's rule of thumb (see parallel.mesh.sae_model_axis)

  c.extract = ml_collections.ConfigDict()
  c.extract.store = ""  # store root (local path or gs://bucket/prefix); "" = WORKDIR/activations.
  # `scope-jax sweep`: the directory of its stores ("" = WORKDIR/stores)
  c.extract.seq_len = 1024  # tokens per sequence, BOS included
  c.extract.mode = "pack"  # pack | truncate (scope_jax/text/sequences.py)
  c.extract.batch_size = 8  # sequences per forward, across all hosts
  c.extract.tokens = 0  # token budget (sequences × (seq_len - 1)); 0 = the whole corpus
  c.extract.shards = 0  # store shards (each written by the process whose devices compute its
  # slice of the batch); 0 = one per process. Fixed, the store's content
  # does not depend on the process count
  c.extract.bucket_rows = 2**20  # rows per shuffled write bucket (per shard)
  c.extract.chunk_rows = 1024  # rows per zarr chunk
  c.extract.dtype = "float32"  # stored dtype: float32 | bfloat16
  c.extract.workers = 0  # threads shuffling, summing and encoding each write bucket; 0 = the host's cores
  c.eval = ml_collections.ConfigDict()
  c.eval.text = ()  # evaluation text; () = the documents extraction held out
  c.eval.strict = False  # refuse (instead of warn) when eval text may overlap training text
  c.eval.sequences = 2_048  # evaluation sequences (Gemma Scope's protocol: 2,048 of 1,024 tokens)
  c.eval.seq_len = 1024
  c.eval.batch_size = 8
  c.eval.bfloat16 = True  # also evaluate with the model and SAEs in bfloat16
  c.eval.delta_loss_se = 0.0  # warn when an SAE's Δ loss standard error (over sequences) exceeds it; 0 = off
  c.eval.saes = ()  # more SAEs to evaluate: Gemma Scope npz / SAELens dirs / our exports
  c.eval.domains = ()  # ((name, source), ...): Δ loss per domain; a data.text source gives its held-out part
  c.eval.domain_sequences = 0  # sequences per domain; 0 = eval.sequences
  c.eval.quantize = ()  # weight formats to evaluate each SAE in (bfloat16, float8_e4m3, int8), model in float32
  c.eval.quantize_sequences = 0  # sequences they are evaluated on (the eval set's first); 0 = all
  c.eval.replacement_layer_sequences = 16  # kind "clt": sequences of the one-layer-at-a-time replacement
  # (one forward per layer per batch; eval/replacement.py)
  c.eval.compare_with = ()  # kind "clt": transcoder sets or CLT directories evaluated as replacement models beside it
  c.finetune = ml_collections.ConfigDict()  # KL finetuning of the exported SAEs (scope_jax/finetune)
  c.finetune.enabled = False  # `run` includes the stage (after export, before eval)
  c.finetune.tokens = 10_000_000  # tokens of training text each SAE is finetuned on
  c.finetune.batch_size = 8  # sequences per step
  c.finetune.seq_len = 1024
  c.finetune.lr = 5e-5  # Adam's rate in training units (recipe.adam_b1 / adam_b2)
  c.finetune.warmup_steps = 0  # linear warm-up from 0.1 lr
  c.finetune.schedule = "linear"  # linear: decay to 0 at the last step | constant
  c.finetune.alpha = "batch"  # α = stopgrad(MSE / KL): batch (every step) | first (the first step's, held)
  c.finetune.sparsity = "keep"  # keep: training's λ | hold_l0: λ steered to the first step's L0
  c.finetune.l0_gain = 0.05  # hold_l0: λ *= exp(gain · (L0 / L0₀ - 1)) per step
  c.finetune.clip_grad_norm = 0.0  # clip the gradient's global norm; 0 = off
  c.finetune.saes = ()  # fnmatch patterns of the export's names to finetune; () = all
  c.finetune.text = ()  # text sources; () = data.text's training documents (never evaluation text)
  c.finetune.checkpoint_every = 100
  c.finetune.log_every = 10
  c.finetune.measure_batches = 4  # batches after the last step on which L0 and densities are measured
  c.grid = ml_collections.ConfigDict()  # `scope-jax sweep` (scope_jax/grid.py); other commands ignore it
  c.grid.layers = ()  # layers to train SAEs at
  c.grid.kinds = ("res",)  # site kinds at every layer: res | mlp | att | mlp_in
  c.grid.widths = ()  # widths every site trains; () = sweep.widths
  c.grid.site_widths = ()  # ((site, (width, ...)), ...): sites that train other widths
  c.grid.transcoders = ()  # transcoder kinds at every layer (transcoder | skip_transcoder): mlp_in.L -> mlp.L
  c.grid.transcoder_widths = ()  # their widths; () = grid.widths (or sweep.widths)
  c.grid.tokens_by_width = ()  # ((up_to_width, tokens), ...): a width's token budget (the first
  # entry covering it; the last beyond); () = extract.tokens for all
  c.grid.extract_by = "layer"  # sites sharing a store: layer (a layer's sites with the same budget
  # in one forward) | site | all
  c.model_mesh = ml_collections.ConfigDict()  # the language model's mesh during extraction
  c.model_mesh.data = -1
  c.model_mesh.model = 1

  c.export = ml_collections.ConfigDict()
  c.export.batches = 16  # batches after training on which L0 and densities are measured
  c.export.int8 = True  # also write the int8 form (W_enc, W_dec int8 with per-latent scales) under export/int8
  c.browse = ml_collections.ConfigDict()  # the feature browser (scope_jax/browse), last stage of `run`
  c.browse.enabled = True  # `run` ends with it; `scope-jax browse` runs it alone
  c.browse.rows = 0  # store rows scanned (0 = all)
  c.browse.chunk_rows = 8_192  # rows encoded at once
  c.browse.top_k = 16  # top-activating contexts per latent
  c.browse.quantiles = (0.25, 0.5, 0.75, 0.95)  # contexts sampled where these quantiles of its activations fall
  c.browse.samples = 2  # contexts per quantile
  c.browse.before = 12  # tokens shown before the active one (inside its document)
  c.browse.after = 4  # and after it
  c.browse.logit_tokens = 10  # promoted and suppressed tokens shown per latent
  c.browse.split_cosine = 0.5  # a wider SAE's latent is a child of its nearest latent from this decoder cosine on
  c.storage = ml_collections.ConfigDict()  # gs:// stores and workdirs (tensorstore's retries; layout.py)
  c.storage.timeout_s = 60.0  # a gs:// root must answer its first request within this, or the job stops naming
  # the bucket, the endpoint and the credentials looked for
  c.storage.retries = 5  # tensorstore's attempts at one failed request, with exponential backoff (1 s, 2 s, ...)
  c.storage.max_retry_delay_s = 16.0  # the longest wait between two attempts
  return c


AT_LEAST = {  # integer fields and their smallest allowed value
  "seed": 0,
  "data.holdout_every": 0,
  "data.window_chunks": 1,
  "data.streams": 0,
  "data.workers": 0,
  "train.batch_size": 1,
  "finetune.tokens": 1,
  "finetune.batch_size": 1,
  "finetune.seq_len": 2,
  "finetune.warmup_steps": 0,
  "finetune.checkpoint_every": 1,
  "finetune.log_every": 1,
  "finetune.measure_batches": 1,
  "train.steps": 1,
  "train.latent_block": 0,
  "train.capacity": 0,
  "train.log_every": 1,
  "train.checkpoint_every": 1,
  "train.keep_checkpoints": 1,
  "storage.retries": 0,
  "mesh.model": 0,
  "extract.seq_len": 2,
  "extract.batch_size": 1,
  "extract.tokens": 0,
  "extract.shards": 0,
  "extract.bucket_rows": 1,
  "extract.chunk_rows": 1,
  "extract.workers": 0,
  "eval.sequences": 1,
  "eval.seq_len": 2,
  "eval.batch_size": 1,
  "eval.domain_sequences": 0,
  "eval.quantize_sequences": 0,
  "export.batches": 1,
  "browse.rows": 0,
  "browse.chunk_rows": 1,
  "browse.top_k": 1,
  "browse.samples": 0,
  "browse.before": 0,
  "browse.after": 0,
  "browse.logit_tokens": 1,
  "recipe.lr_warmup_steps": 0,
  "recipe.lr_decay_steps": 0,
  "recipe.sparsity_warmup_steps": 0,
  "recipe.dead_window_steps": 1,
  "recipe.auxk_k": 0,
}
POSITIVE = (
  "finetune.lr",
  "finetune.l0_gain",
  "recipe.lr",
  "recipe.adam_eps",
  "recipe.bandwidth",
  "storage.timeout_s",
  "storage.max_retry_delay_s",
)
NON_NEGATIVE = (
  "finetune.clip_grad_norm",
  "recipe.clip_grad_norm",
  "recipe.dead_latent_loss",
  "recipe.init_threshold",
  "recipe.frequency_scale",
  "recipe.auxk_coefficient",
  "eval.delta_loss_se",
)
BELOW_ONE = ("recipe.adam_b1", "recipe.adam_b2")  # in [0, 1)


def _get(config: ml_collections.ConfigDict, field: str):
  for part in field.split("."):
    config = config[part]
  return config


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_site(value) -> bool:
  from scope_jax.models.sites import parse_site

  try:
    parse_site(value)
  except ValueError:
    return False
  return True


def choices() -> dict[str, tuple[str, ...]]:
  """Fields that take one of a few names, with the names as the modules that use them define them."""
  from scope_jax.parallel.precision import PRECISIONS

  return {
    "model_dtype": DTYPES,
    "precision": tuple(PRECISIONS),
    "extract.dtype": DTYPES,
    "extract.mode": MODES,
    "data.nonfinite": NONFINITE,
    "recipe.normalize": NORMALIZATIONS,
    "recipe.sparsity_loss": SPARSITY_LOSSES,
    "grid.extract_by": EXTRACT_BY,
    "train.step": TRAIN_STEPS,
    "kind": tuple(KINDS),
    "sweep.activation": ACTIVATIONS,
    "finetune.alpha": ALPHA_RULES,
    "finetune.sparsity": SPARSITY_RULES,
    "finetune.schedule": SCHEDULES,
  }


def problems(config: ml_collections.ConfigDict, command: str = "run") -> list[str]:
  """Every field whose value is out of its type or range, and every broken cross-field rule of
  `command` (the CLI's; `extract` does not read `site`), as `"FIELD = VALUE: expected ..."`
  lines (empty when the config is sound)."""
  found = []

  def check(field: str, ok: bool, expected: str) -> None:
    if not ok:
      found.append(f"{field} = {_get(config, field)!r}: expected {expected}")

  for field, names in choices().items():
    check(field, _get(config, field) in names, f"one of {tuple(sorted(names))}")
  for field, least in AT_LEAST.items():
    value = _get(config, field)
    check(field, _is_int(value) and value >= least, f"an integer >= {least}")
  for field in POSITIVE:
    value = _get(config, field)
    check(field, _is_number(value) and value > 0, "a number > 0")
  for field in NON_NEGATIVE:
    value = _get(config, field)
    check(field, _is_number(value) and value >= 0, "a number >= 0")
  for field in BELOW_ONE:
    value = _get(config, field)
    check(field, _is_number(value) and 0 <= value < 1, "a number in [0, 1)")
  for field in ("mesh.data", "model_mesh.data", "model_mesh.model"):
    value = _get(config, field)
    check(field, _is_int(value) and (value == -1 or value >= 1), "-1 or an integer >= 1")
  widths, lambdas, seeds = config.sweep.widths, config.sweep.l1_coefficients, config.sweep.seeds
  check("sweep.widths", bool(widths) and all(_is_int(w) and w >= 1 for w in widths), "positive integers")
  check("sweep.l1_coefficients", bool(lambdas) and all(_is_number(v) and v >= 0 for v in lambdas), "numbers >= 0")
  check("sweep.seeds", bool(seeds) and all(_is_int(v) and v >= 0 for v in seeds), "integers >= 0")
  check(
    "browse.split_cosine",
    _is_number(config.browse.split_cosine) and -1 <= config.browse.split_cosine <= 1,
    "a cosine in [-1, 1]",
  )
  from scope_jax.sae.quantize import QUANTIZED

  check("eval.quantize", all(f in QUANTIZED for f in config.eval.quantize), f"a subset of {QUANTIZED}")
  domains = config.eval.domains
  pairs = all(isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(v, str) for v in d) for d in domains)
  check("eval.domains", pairs, "(name, text source) pairs, e.g. (('docs', 'builtin:python-docs'),)")
  if pairs:
    check("eval.domains", len({n for n, _ in domains}) == len(domains), "distinct names")
  q = config.browse.quantiles
  check("browse.quantiles", all(_is_number(v) and 0 < v <= 1 for v in q), "numbers in (0, 1]")
  prefixes = config.sweep.prefixes
  if widths and all(_is_int(w) and w >= 1 for w in widths):
    narrowest = min(widths)
    ok = all(_is_int(p) and p >= 1 for p in prefixes) and all(b > a for a, b in zip(prefixes, prefixes[1:]))
    check("sweep.prefixes", ok, "positive integers, strictly increasing (Matryoshka prefix sizes)")
    if ok and prefixes:
      check("sweep.prefixes", prefixes[-1] <= narrowest, f"sizes at most the narrowest width ({narrowest})")
  capacity = config.train.capacity
  if _is_int(capacity) and capacity and all(_is_int(w) for w in widths) and widths:
    check("train.capacity", capacity <= min(widths), f"at most the narrowest width ({min(widths)}), or 0 (automatic)")
  if _is_int(config.recipe.lr_decay_steps) and _is_int(config.train.steps):
    check("recipe.lr_decay_steps", config.recipe.lr_decay_steps <= config.train.steps, "at most train.steps")
  sites = tuple(config.sites)
  check("sites", bool(sites) and all(_is_site(v) for v in sites), "site names KIND.LAYER, e.g. ('res.6',)")
  duplicated = sorted({v for v in sites if sites.count(v) > 1})
  check("sites", not duplicated, f"each site once (repeated: {duplicated})")
  if config.site is not None:
    check("site", _is_site(config.site), "a site name KIND.LAYER, e.g. 'res.6'")
    if config.data.path is None and command != "extract":  # training reads the store extraction writes
      check("site", config.site in sites, f"one of sites {sites} (the store holds those), or set data.path")
  if config.kind in TRANSCODER_KINDS and command != "extract":
    found.extend(transcoder_problems(config))
  if config.kind == "clt":
    found.extend(clt_problems(config))
  if config.recipe.sparsity_loss == "quadratic":
    target = config.recipe.target_l0
    check("recipe.target_l0", _is_number(target) and target > 0, "a number > 0 (sparsity_loss 'quadratic')")
  found.extend(ranked_problems(config))
  return found


def ranked_problems(config: ml_collections.ConfigDict) -> list[str]:
  """TopK and BatchTopK sweeps: k below every width, AuxK's k_aux within the width, BatchTopK's
  k·batch counted exactly (train/topk.py), no JumpReLU-only term; a JumpReLU sweep takes no k."""
  s, r = config.sweep, config.recipe
  widths = [w for w in s.widths if _is_int(w) and w >= 1]
  ks = tuple(s.k)
  if s.activation == "jumprelu":
    return [f"sweep.k = {ks!r}: expected () for sweep.activation 'jumprelu' (it sweeps λ)"] if ks else []
  if not ks or not all(_is_int(k) and k >= 1 for k in ks):
    return [f"sweep.k = {ks!r}: expected positive integers (latents per token) for sweep.activation {s.activation!r}"]
  found = []
  if widths and max(ks) >= min(widths):
    found.append(f"sweep.k = {ks!r}: expected every k below every width (the narrowest is {min(widths)})")
  if _is_int(r.auxk_k) and widths and r.auxk_k > min(widths):
    found.append(f"recipe.auxk_k = {r.auxk_k}: expected at most the narrowest width ({min(widths)}), or 0 (d/2)")
  batch = config.train.batch_size
  if s.activation == "batchtopk" and _is_int(batch) and max(ks) * batch >= 2**24:
    found.append(f"sweep.k = {ks!r}: k × train.batch_size ({max(ks) * batch:,}) must stay below 2^24 (16,777,216)")
  if not (_is_number(r.threshold_ema) and 0 < r.threshold_ema <= 1):
    found.append(f"recipe.threshold_ema = {r.threshold_ema!r}: expected a rate in (0, 1]")
  for field in ("dead_latent_loss", "frequency_scale"):
    if r[field]:
      found.append(f"recipe.{field} = {r[field]!r}: a JumpReLU term; expected 0 for sweep.activation {s.activation!r}")
  if r.sparsity_loss != "l0":
    found.append(f"recipe.sparsity_loss = {r.sparsity_loss!r}: k sets the L0 of sweep.activation {s.activation!r}")
  if s.activation == "topk" and (problem := topk_problem(config.kind, tuple(s.prefixes))):
    found.append(problem)
  return found


def clt_problems(config: ml_collections.ConfigDict) -> list[str]:
  """A CLT: a layer range whose sites the store holds, one width, JumpReLU with the l0 loss."""
  from scope_jax.core.kinds import clt_layers, clt_sites

  first, last = config.clt.first_layer, config.clt.last_layer
  if not (_is_int(first) and _is_int(last) and 0 <= first <= last):
    return [f"clt.first_layer, clt.last_layer = {first!r}, {last!r}: expected layers 0 <= first <= last"]
  found = []
  if len(config.sweep.widths) != 1:
    found.append(f"sweep.widths = {tuple(config.sweep.widths)!r}: a CLT sweep trains one width (latents per layer)")
  if config.sweep.activation != "jumprelu" or config.sweep.prefixes:
    found.append(
      f"sweep.activation = {config.sweep.activation!r}, sweep.prefixes = {tuple(config.sweep.prefixes)!r}: "
      "a CLT is trained as JumpReLU without Matryoshka prefixes"
    )
  if config.recipe.sparsity_loss != "l0" or config.recipe.frequency_scale:
    found.append(
      f"recipe.sparsity_loss = {config.recipe.sparsity_loss!r}, frequency_scale = "
      f"{config.recipe.frequency_scale!r}: a CLT trains with 'l0' weighted by decoder norms, no frequency penalty"
    )
  inputs, targets = clt_sites(clt_layers(config))
  if config.data.path is None and (missing := [v for v in inputs + targets if v not in tuple(config.sites)]):
    found.append(f"sites = {tuple(config.sites)!r}: a CLT of layers {first}-{last} needs {missing} in the store too")
  return found


def transcoder_problems(config: ml_collections.ConfigDict) -> list[str]:
  """A transcoder's input and target: sites of one layer, both in the store extraction writes."""
  from scope_jax.models.sites import parse_site

  site, target = config.site, config_target_site(config)
  if site is None or not _is_site(site):
    return [f"site = {site!r}: expected the transcoder's input site (e.g. 'mlp_in.6') with kind = {config.kind!r}"]
  if target is None or not _is_site(target):
    return [
      f"target_site = {config.target_site!r}: expected the transcoder's target site (e.g. 'mlp.6'); "
      f"it defaults to mlp.L only for site mlp_in.L, not {site!r}"
    ]
  found = []
  if parse_site(target).layer != parse_site(site).layer:
    layer = parse_site(site).layer
    found.append(f"target_site = {target!r}: expected a site of layer {layer}, the layer of site {site!r}")
  if target == site:
    found.append(f"target_site = {target!r}: a transcoder's target must differ from its input site")
  if config.data.path is None and target not in tuple(config.sites):
    found.append(f"target_site = {target!r}: expected one of sites {tuple(config.sites)} (the store holds those)")
  return found


def validate(config: ml_collections.ConfigDict, command: str = "run") -> ml_collections.ConfigDict:
  """The config, or a ValueError naming every field that is wrong and what was expected."""
  if found := problems(config, command):
    raise ValueError("config fields out of range:\n  " + "\n  ".join(found))
  return config


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
