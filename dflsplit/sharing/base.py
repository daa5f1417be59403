"""Sharing layer: what of a model goes on the wire, how it comes back, and how it is combined.

A `Sharing` owns both ends of the wire for one node:

* ``encode(model, round_)`` → a `Payload` (named tensors and a JSON header) sent to every
  receiver of the round; it may keep state between rounds (e.g. top-k's error feedback);
* ``expect(sender, round_, own)`` → what a valid incoming payload looks like (tensor name →
  (shape, dtype), a ``None`` dimension being of any length up to ``max_numel``), checked by
  the transport before the payload reaches ``decode``;
* ``decode(sender, round_, tensors, header, own)`` → the sender's model as dense tensors
  with the names and shapes of ``own`` (coordinates a compressed payload does not carry
  are taken from ``own``); a payload that does not decode raises `PayloadMismatch`;
* ``aggregate(model, own, received, weights, self_id)`` → combines with the configured
  aggregator.

Only floating-point tensors of the state dict are shared; integer buffers (e.g.
BatchNorm's step counter) stay local.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..communication.base import PayloadMismatch
from ..registry import Registry
from .aggregators import Aggregation
from .vectors import flatten, unflatten

SHARINGS: Registry[type["Sharing"]] = Registry("sharing")

Spec = dict[str, tuple[tuple[Any, ...], str]]


@dataclass
class Payload:
    """What a node sends in one round: named tensors and a JSON-serialisable header."""

    tensors: dict[str, torch.Tensor]
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what the payload carries, headers excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point tensors of `model`'s state dict (detached, not copied)."""
    return {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}


def numel(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def mixing_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, sender, round), the same on every node."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class Sharing:
    """Base and `full` sharing: every floating-point tensor of the state dict, as it is.

    Subclasses override `encode`, `expect` and `decode` for wire formats of their own.
    `cfg` is the whole Config; `keys` the implementation's own keys (``cfg.sharing.options``).
    """

    def __init__(self, cfg, uid: int):
        self.cfg = cfg
        self.uid = uid
        self.aggregate_fn = Aggregation.from_config(cfg)

    def state_dict(self) -> dict[str, Any]:
        """State kept between rounds (for checkpoints); none for `full`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""

    # sending ---------------------------------------------------------------------
    def encode(self, model: nn.Module, round_: int) -> Payload:
        """The payload this node sends in `round_` (copies: later changes to the model do not
        reach a payload still on its way)."""
        return Payload({k: v.to("cpu", copy=True) for k, v in shared_state(model).items()})

    # receiving -------------------------------------------------------------------
    def expect(self, sender: int, round_: int, own: Mapping[str, torch.Tensor]) -> Spec:
        """Tensor name → (shape, dtype name) of a valid payload from `sender` in `round_`."""
        return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in own.items()}

    def decode(
        self, sender: int, round_: int, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any],
        own: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The sender's model as dense tensors named, shaped and placed like `own`."""
        return {k: tensors[k].to(own[k].device) for k in own}

    # combining -------------------------------------------------------------------
    def aggregate(
        self,
        model: nn.Module,
        own: Mapping[str, torch.Tensor],
        received: Mapping[int, Mapping[str, torch.Tensor]],
        weights: Mapping[int, float],
        self_id: int,
    ) -> None:
        """Replace the model's shared tensors by the aggregate of its own and the received ones.

        `weights` maps node ids (including `self_id`) to mixing weights; every received
        model is dense (already decoded).
        """
        ids = [self_id, *sorted(received)]
        tensors = [own, *(received[i] for i in ids[1:])]
        new = self.aggregate_fn(tensors, [weights[i] for i in ids])
        model.load_state_dict(new, strict=False)

    # helpers for subclasses ----------------------------------------------------------
    @staticmethod
    def mismatch(sender: int, round_: int, what: str) -> PayloadMismatch:
        return PayloadMismatch(f"payload of round {round_} from node {sender} rejected: {what}")


SHARINGS.register("full")(Sharing)
FullSharing = Sharing


def count_for(alpha: float, d: int) -> int:
    """How many of `d` coordinates a fraction `alpha` sends (at least 1 when d > 0)."""
    return min(d, max(1 if d else 0, math.ceil(alpha * d)))


__all__ = [
    "SHARINGS", "Payload", "Sharing", "FullSharing", "Spec", "shared_state", "flatten", "unflatten",
    "numel", "mixing_seed", "count_for",
]
