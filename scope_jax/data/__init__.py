"""Activation batches for the trainer: the source interface and its implementations."""

from scope_jax.data.source import ArraySource, BatchSource, open_source

__all__ = ["ArraySource", "BatchSource", "open_source"]
