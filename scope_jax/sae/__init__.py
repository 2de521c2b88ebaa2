"""JumpReLU sparse autoencoders: the activation, the pytree, folding, file formats."""

from scope_jax.sae.io import hook_name, load_sae, save_sae, width_name
from scope_jax.sae.jumprelu import heaviside, jumprelu
from scope_jax.sae.model import SAE, SAEInfo, fold, init_sae, training_pre, unstack

__all__ = [
  "SAE",
  "SAEInfo",
  "fold",
  "heaviside",
  "hook_name",
  "init_sae",
  "jumprelu",
  "load_sae",
  "save_sae",
  "training_pre",
  "unstack",
  "width_name",
]
