"""The feature browser: per-latent statistics streamed over the activation store, contexts read back
through the store's trace, and a static site (scope_jax/browse/browser.py)."""

from scope_jax.browse.browser import browse_identity, run_browse

__all__ = ["browse_identity", "run_browse"]
