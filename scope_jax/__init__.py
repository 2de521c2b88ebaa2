"""scope_jax: train Gemma Scope-style JumpReLU sparse autoencoders in JAX."""

from scope_jax.models import GemmaConfig, LanguageModel, Tokenizer, load_model
from scope_jax.parallel import make_mesh

__version__ = "0.1.0"
__all__ = ["GemmaConfig", "LanguageModel", "Tokenizer", "load_model", "make_mesh"]
