"""scope_jax: train Gemma Scope-style JumpReLU sparse autoencoders in JAX."""

from scope_jax.models import FromSite, GemmaConfig, LanguageModel, Tokenizer, load_model
from scope_jax.parallel import make_mesh
from scope_jax.sae import SAE, load_sae, save_sae

__version__ = "0.1.0"
__all__ = [
  "SAE",
  "FromSite",
  "GemmaConfig",
  "LanguageModel",
  "Tokenizer",
  "load_model",
  "load_sae",
  "make_mesh",
  "save_sae",
]
