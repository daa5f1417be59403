"""Sharing layer: what of a model goes on the wire, how it comes back, and how received
models are combined (aggregators, federated server optimizers)."""

from .aggregators import AGGREGATORS, weighted_average
from .base import SHARINGS, FullSharing, Payload, Sharing
from . import compression  # noqa: F401  (registers "topk", "subsample", "quantize")
from .server_optimizers import SERVER_OPTIMIZERS, build_server_optimizer

__all__ = [
    "AGGREGATORS", "weighted_average", "SHARINGS", "FullSharing", "Payload", "Sharing",
    "SERVER_OPTIMIZERS", "build_server_optimizer",
]
