"""Aggregation rules: pure functions of (list of tensor dicts, list of weights) → tensor dict."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from ..registry import Registry

TensorDict = Mapping[str, torch.Tensor]
AGGREGATORS: Registry[Callable[[Sequence[TensorDict], Sequence[float]], dict[str, torch.Tensor]]] = Registry(
    "aggregator"
)


@AGGREGATORS.register("mixing")
def weighted_average(models: Sequence[TensorDict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ w_i · x_i for every tensor name (the weights are used as given, e.g. Metropolis–Hastings)."""
    if len(models) != len(weights) or not models:
        raise ValueError(f"need one weight per model, got {len(models)} models and {len(weights)} weights")
    out = {}
    for name, first in models[0].items():
        acc = first.to(torch.float64 if first.dtype == torch.float64 else torch.float32) * weights[0]
        for m, w in zip(models[1:], weights[1:]):
            acc.add_(m[name].to(acc.dtype), alpha=w)
        out[name] = acc.to(first.dtype)
    return out


@AGGREGATORS.register("none")
def keep_own(models: Sequence[TensorDict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The first model (a node's own) unchanged: switches aggregation off, a baseline."""
    if not models:
        raise ValueError("need at least one model")
    return {k: v.clone() for k, v in models[0].items()}


@AGGREGATORS.register("mean")
def mean(models: Sequence[TensorDict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Unweighted average (weights ignored)."""
    return weighted_average(models, [1.0 / len(models)] * len(models))
