"""Aggregation rules: pure functions of (vectors, weights) → vector, registered by name.

* An aggregator ``f(x, w, **keys) -> Tensor[d]`` takes the n input vectors as the rows of
  ``x`` (Tensor[n, d], float32 or float64) and their weights ``w`` (Tensor[n], summing to 1;
  weight-aware rules such as ``mixing`` use them, robust rules ignore them). By convention
  row 0 is the aggregating node's own vector (``centered_clipping`` may start from it).
* A pre-aggregator ``g(x, w, **keys) -> (Tensor[m, d], Tensor[m])`` maps inputs to inputs
  (NNM, bucketing, ARC, clipping) and composes in front of any aggregator.
* ``keys``: each rule receives only the keys its dataclass declares (`AGGREGATORS.keys_of`);
  in a config they are keys of the ``sharing`` section, shared by the rules of one chain
  (``aggregator: [nnm, trimmed_mean]`` with ``f: 2`` gives both f = 2).

`aggregate_vectors` runs a chain on a matrix; `aggregate_models` does the same on tensor
dicts (flattened into one matrix, the result unflattened like the first model). Every
place that combines models (gossip nodes, the federated server, split replica sync) goes
through `Aggregation`, built from the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch

from ..registry import Registry
from .vectors import unflatten

TensorDict = Mapping[str, torch.Tensor]
AGGREGATORS: Registry[Callable[..., torch.Tensor]] = Registry("aggregator")
PRE_AGGREGATORS: Registry[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = Registry("pre-aggregator")


def rule_keys(registry: Registry, name: str, keys: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `keys` that rule `name` declares."""
    cls = registry.keys_of(name)
    if cls is None:
        return {}
    return {f.name: keys[f.name] for f in dataclasses.fields(cls) if f.name in keys}


def split_chain(chain: str | Sequence[str]) -> tuple[list[str], str]:
    """(pre-aggregators, aggregator) of a chain: a name or a list ending in an aggregator."""
    names = [chain] if isinstance(chain, str) else list(chain)
    if not names:
        raise ValueError("an aggregation chain needs at least an aggregator")
    *pre, last = names
    for p in pre:
        PRE_AGGREGATORS.get(p)
    AGGREGATORS.get(last)
    return pre, last


def aggregate_vectors(chain: str | Sequence[str], x: torch.Tensor, weights: torch.Tensor | Sequence[float],
                      keys: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Run the chain (pre-aggregators in order, then the aggregator) on the rows of `x`."""
    keys = keys or {}
    pre, last = split_chain(chain)
    w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    if x.dim() != 2 or w.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"need n >= 1 vectors as the rows of x and one weight per row, got x {tuple(x.shape)}, "
                         f"weights {tuple(w.shape)}")
    for p in pre:
        x, w = PRE_AGGREGATORS.get(p)(x, w, **rule_keys(PRE_AGGREGATORS, p, keys))
    return AGGREGATORS.get(last)(x, w, **rule_keys(AGGREGATORS, last, keys))


def stack_models(models: Sequence[TensorDict], names: Sequence[str]) -> torch.Tensor:
    """The models' tensors `names`, each model flattened into one row (float64 if any
    tensor is float64, else float32)."""
    dtype = torch.float64 if any(m[k].dtype == torch.float64 for m in models for k in names) else torch.float32
    return torch.stack([torch.cat([m[k].reshape(-1).to(dtype) for k in names]) if names else torch.zeros(0, dtype=dtype)
                        for m in models])


def aggregate_models(chain: str | Sequence[str], models: Sequence[TensorDict], weights: Sequence[float],
                     keys: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The chain applied to tensor dicts: every model flattened into a row; the result has
    the names, shapes, dtypes and device of the first model's tensors."""
    if len(models) != len(weights) or not models:
        raise ValueError(f"need one weight per model, got {len(models)} models and {len(weights)} weights")
    names = list(models[0])
    first = models[0]
    device = next(iter(first.values())).device if first else torch.device("cpu")
    x = stack_models([{k: m[k].to(device) for k in names} for m in models], names)
    return unflatten(aggregate_vectors(chain, x, weights, keys), first)


class Aggregation:
    """The configured chain with its keys: ``Aggregation(chain, keys)(models, weights)``."""

    def __init__(self, chain: str | Sequence[str], keys: Mapping[str, Any] | None = None):
        self.pre, self.last = split_chain(chain)
        self.chain = [*self.pre, self.last]
        self.keys = dict(keys or {})

    @classmethod
    def from_config(cls, cfg) -> "Aggregation":
        """From ``sharing.aggregator`` and the aggregation keys of the ``sharing`` section."""
        return cls(cfg.sharing.aggregator, getattr(cfg.sharing, "aggregation_keys", {}))

    def __call__(self, models: Sequence[TensorDict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        if self.chain == ["mixing"]:  # the common case, tensor by tensor (no flattening)
            return weighted_average(models, weights)
        return aggregate_models(self.chain, models, weights, self.keys)

    def __repr__(self) -> str:
        return f"Aggregation({self.chain}, {self.keys})"


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


@AGGREGATORS.register("mixing")
def mixing(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ w_i · x_i with the weights as given (e.g. Metropolis–Hastings, or sample counts)."""
    return w @ x


@AGGREGATORS.register("mean")
def mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The unweighted average of the rows (weights ignored)."""
    return x.mean(0)


@AGGREGATORS.register("none")
def keep_own(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Row 0 (a node's own vector) unchanged: switches aggregation off, a baseline."""
    return x[0].clone()
