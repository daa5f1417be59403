"""Model layer: networks built by name, each a sequence of declared partitions."""

from .base import MODELS, ModelBuilder, PartitionedModel, build_model, cut_sequential, register_model
from . import zoo  # noqa: F401  (registers the networks)

__all__ = ["MODELS", "ModelBuilder", "PartitionedModel", "build_model", "cut_sequential", "register_model"]
