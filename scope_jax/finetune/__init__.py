"""KL finetuning: a trained SAE spliced into the frozen model, trained a little longer to keep the
model's next-token distribution (docs/recipe.md §15)."""

from scope_jax.finetune.stage import run_finetune

__all__ = ["run_finetune"]
