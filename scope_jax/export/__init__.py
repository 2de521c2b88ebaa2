"""Export a trained sweep: fold the normalization back, measure L0 and densities, write Gemma Scope
and SAELens files and the export index."""

from scope_jax.export.exporter import export

__all__ = ["export"]
