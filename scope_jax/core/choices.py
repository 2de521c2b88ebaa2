"""The names a config field may take where it names one of a few choices, in one place: config.py
validates against them, and the stage that acts on each field imports it from here."""

DTYPES = ("float32", "bfloat16")  # extract.dtype, model_dtype: how activations are stored, the model computes
MODES = ("pack", "truncate")  # extract.mode: documents packed into sequences, or each cut to one
NONFINITE = ("error", "skip")  # data.nonfinite: a row holding NaN or Inf stops the loader, or is replaced
NORMALIZATIONS = ("raw", "centred")  # recipe.normalize: how C is chosen (data/normalization.py)
SPARSITY_LOSSES = ("l0", "quadratic")  # recipe.sparsity_loss (sae/loss.py)
TRAIN_STEPS = ("auto", "dense", "sparse")  # train.step: which step runs (train/selection.py)
EXTRACT_BY = ("layer", "site", "all")  # grid.extract_by: one store per layer, per site, or one for all
ACTIVATIONS = ("jumprelu", "topk", "batchtopk")  # sweep.activation: θ per latent, k per token, k per token on average
ALPHA_RULES = ("batch", "first")  # finetune.alpha: α = stopgrad(MSE / KL) every step, or the first step's held
SPARSITY_RULES = ("keep", "hold_l0")  # finetune.sparsity: training's λ, or λ steered to hold L0 (finetune/kl.py)
SCHEDULES = ("linear", "constant")  # finetune.schedule: the rate decays linearly to 0, or stays
