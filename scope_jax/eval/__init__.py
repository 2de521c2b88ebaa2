"""Evaluation: L0, FVU, delta LM loss with the SAE spliced in, densities, plots and reports."""

from scope_jax.eval.evaluate import evaluate_saes, run_eval
from scope_jax.eval.statistics import SAEStats

__all__ = ["SAEStats", "evaluate_saes", "run_eval"]
