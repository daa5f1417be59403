"""Training layer: local optimisation on a node's shard, and evaluation."""

from .base import TRAININGS, BatchSampler, Training, build_optimizer, evaluate
from . import local_sgd  # noqa: F401  (registers "local_sgd")

__all__ = ["TRAININGS", "BatchSampler", "Training", "build_optimizer", "evaluate"]
