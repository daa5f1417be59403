"""Training layer: local optimisation on a node's shard, and evaluation."""

from .base import OPTIMIZERS, TRAININGS, BatchSampler, Training, build_optimizer, evaluate
from . import fedprox, local_sgd  # noqa: F401  (registers "local_sgd", "fedprox")

__all__ = ["OPTIMIZERS", "TRAININGS", "BatchSampler", "Training", "build_optimizer", "evaluate"]
