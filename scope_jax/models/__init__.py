"""Gemma 2 / Gemma 3 in Flax NNX: configs, checkpoint loaders, tokenizer, activation sites."""

from scope_jax.models.config import PRESETS, GemmaConfig
from scope_jax.models.gemma import FromSite
from scope_jax.models.lm import LanguageModel, load_model
from scope_jax.models.sites import SITE_KINDS, Site, parse_site
from scope_jax.text.tokenizer import Tokenizer

__all__ = [
  "PRESETS",
  "FromSite",
  "GemmaConfig",
  "SITE_KINDS",
  "LanguageModel",
  "Site",
  "Tokenizer",
  "load_model",
  "parse_site",
]
