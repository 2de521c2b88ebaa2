"""Activation batches for the trainer: the source interface and its implementations."""

from scope_jax.data.batch import Batch, BatchSource
from scope_jax.data.source import ArraySource, PairedSource, open_source

__all__ = ["ArraySource", "Batch", "BatchSource", "PairedSource", "open_source"]
