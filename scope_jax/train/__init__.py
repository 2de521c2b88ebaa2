"""The sweep trainer: many JumpReLU SAEs in one sharded step, checkpointed and resumable."""

from scope_jax.train.checkpoints import Preempted
from scope_jax.train.health import TrainingDiverged
from scope_jax.train.trainer import train

__all__ = ["Preempted", "TrainingDiverged", "train"]
