"""Sharing layer: what of a model is sent, and how received tensors are combined."""

from .aggregators import AGGREGATORS, weighted_average
from .base import SHARINGS, FullSharing, Sharing

__all__ = ["AGGREGATORS", "weighted_average", "SHARINGS", "FullSharing", "Sharing"]
