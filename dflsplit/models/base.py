"""Networks as a sequence of partitions, so split learning can cut them where they declare.

Every model is a `PartitionedModel`: an ``nn.Sequential`` whose children are its
partitions in order. A registered builder declares ``num_partitions`` (None when the
count is configured, as for `mlp`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..registry import Registry


class ModelBuilder:
    """Registry entry: `build(cfg, input_shape, num_classes)` and the declared partition count."""

    def __init__(self, fn: Callable[..., "PartitionedModel"], num_partitions: int | None, doc: str):
        self.fn = fn
        self.num_partitions = num_partitions
        self.__doc__ = doc

    def build(self, cfg, input_shape: Sequence[int], num_classes: int) -> "PartitionedModel":
        return self.fn(cfg, tuple(input_shape), num_classes)


MODELS: Registry[ModelBuilder] = Registry("model")


def register_model(name: str, num_partitions: int | None, keys: type | None = None):
    """Decorator registering `fn(cfg, input_shape, num_classes) -> PartitionedModel` under `name`;
    `keys` is the dataclass of the model's own config keys."""

    def deco(fn):
        MODELS.register(name, keys=keys)(ModelBuilder(fn, num_partitions, fn.__doc__ or ""))
        return fn

    return deco


class PartitionedModel(nn.Sequential):
    """An ``nn.Sequential`` whose children are the model's partitions, first to last."""

    def partitions(self) -> list[nn.Module]:
        return list(self.children())

    @property
    def num_partitions(self) -> int:
        return len(self)


def cut_sequential(layers: Sequence[nn.Module], parts: int) -> list[nn.Sequential]:
    """Cut consecutive layers into `parts` contiguous, non-empty pieces balanced by parameter count.

    Minimises the largest piece's cost (parameters + 1 per layer, so parameter-free
    layers weigh a little), by dynamic programming over cut points.
    """
    layers = list(layers)
    n = len(layers)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} layers into {parts} partitions (need 1..{n})")
    cost = [sum(p.numel() for p in m.parameters()) + 1 for m in layers]
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        bounds.append((cut[k][i], i))
        i = cut[k][i]
    return [nn.Sequential(*layers[a:b]) for a, b in reversed(bounds)]


def flat_size(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Number of features `module` outputs per sample for `input_shape` (shape inference only)."""
    with torch.no_grad():
        return int(module(torch.zeros(1, *input_shape)).numel())


def build_model(cfg, input_shape: Sequence[int], num_classes: int, seed: int | None = None) -> PartitionedModel:
    """Build the model named by `cfg.name` (a ModelConfig); with `seed`, weights are deterministic."""
    builder = MODELS.get(cfg.name)
    if seed is not None:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        return builder.build(cfg, input_shape, num_classes)
    finally:
        if seed is not None:
            torch.random.set_rng_state(state)
