"""Sharing layer: what of a model is sent, and how received tensors are combined."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..registry import Registry
from .aggregators import AGGREGATORS

SHARINGS: Registry[type["Sharing"]] = Registry("sharing")


class Sharing:
    """Base: send every floating-point tensor of the state dict; combine with the configured aggregator.

    Integer buffers (e.g. BatchNorm's step counter) stay local.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.aggregate_fn = AGGREGATORS.get(cfg.sharing.aggregator)

    def outgoing(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors to send to neighbours this round."""
        return {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}

    def aggregate(
        self,
        model: nn.Module,
        own: Mapping[str, torch.Tensor],
        received: Mapping[int, Mapping[str, torch.Tensor]],
        weights: Mapping[int, float],
        self_id: int,
    ) -> None:
        """Replace the model's shared tensors by the aggregate of its own and the received ones.

        `weights` maps node ids (including `self_id`) to mixing weights.
        """
        ids = [self_id, *sorted(received)]
        tensors = [own, *(received[i] for i in ids[1:])]
        new = self.aggregate_fn(tensors, [weights[i] for i in ids])
        model.load_state_dict(new, strict=False)


@SHARINGS.register("full")
class FullSharing(Sharing):
    """The whole model every round."""
