"""Sharing layer: what of a model goes on the wire, how it comes back, and how received
models are combined (aggregators, federated server optimizers)."""

from .aggregators import AGGREGATORS, PRE_AGGREGATORS, Aggregation, aggregate_models, aggregate_vectors, weighted_average
from .base import SHARINGS, FullSharing, Payload, Sharing
from . import compression  # noqa: F401  (registers "topk", "subsample", "quantize")
from . import robust  # noqa: F401
from .attacks import ATTACKS
from .server_optimizers import SERVER_OPTIMIZERS, build_server_optimizer

__all__ = [
    "AGGREGATORS", "PRE_AGGREGATORS", "Aggregation", "aggregate_models", "aggregate_vectors", "weighted_average", "SHARINGS", "FullSharing", "Payload", "Sharing",
    "SERVER_OPTIMIZERS", "build_server_optimizer", "ATTACKS",
]
