"""The sweep trainer: many JumpReLU SAEs in one sharded step, checkpointed and resumable."""

from scope_jax.train.trainer import Preempted, TrainingDiverged, train

__all__ = ["Preempted", "TrainingDiverged", "train"]
