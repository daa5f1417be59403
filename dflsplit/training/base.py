"""Training layer: local optimisation steps on a model and a data shard, and evaluation."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ..registry import Registry, key

TRAININGS: Registry[type["Training"]] = Registry("training")


#: name → ``f(cfg: OptimizerConfig, params) -> torch.optim.Optimizer``
OPTIMIZERS: Registry = Registry("optimizer")


@dataclass
class SGDKeys:
    """Keys of optimizer `sgd`."""

    momentum: float = key(0.0, "momentum factor", ge=0, lt=1)
    nesterov: bool = key(False, "Nesterov momentum (needs momentum > 0)")


@dataclass
class AdamKeys:
    """Keys of optimizer `adam`."""

    beta1: float = key(0.9, "first-moment decay", ge=0, lt=1)
    beta2: float = key(0.999, "second-moment decay", ge=0, lt=1)
    eps: float = key(1e-8, "term added to the denominator", gt=0)


@OPTIMIZERS.register("sgd", keys=SGDKeys)
def _sgd(cfg, params):
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


@OPTIMIZERS.register("adam", keys=AdamKeys)
def _adam(cfg, params):
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name` (an OptimizerConfig), with its keys."""
    return OPTIMIZERS.get(cfg.name)(cfg, params)


class BatchSampler:
    """Endless mini-batches of a shard: reshuffled each pass, deterministic for a generator.

    With ``drop_last`` (the default, local SGD's sampler) a pass yields ``n // batch_size``
    full batches and the remainder waits for a later pass; without it a pass yields
    ``ceil(n / batch_size)`` batches, the last one smaller, so every sample is drawn exactly
    once per pass (split learning's epochs).
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True):
        if n == 0:
            raise ValueError("cannot sample batches from an empty shard")
        self.n, self.batch_size, self.gen = n, min(batch_size, n), generator
        self.drop_last = drop_last
        self._order = torch.randperm(n, generator=generator)
        self._pos = 0

    @property
    def batches_per_pass(self) -> int:
        """Batches of one pass over the shard."""
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def next(self) -> torch.Tensor:
        end = self._pos + self.batch_size
        if end > self.n and (self.drop_last or self._pos >= self.n):
            self._order = torch.randperm(self.n, generator=self.gen)
            self._pos, end = 0, self.batch_size
        idx = self._order[self._pos : min(end, self.n)]
        self._pos = end
        return idx

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.n / self.batch_size))

    def state_dict(self) -> dict:
        """Where the sampler is: this pass's order, the position in it, the generator's state."""
        return {"order": self._order.clone(), "pos": self._pos, "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._order, self._pos = state["order"].clone(), int(state["pos"])
        self.gen.set_state(state["generator"])


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 200) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `model` on (x, y), `batch_size` samples at a time
    (moderate batches keep activation memory small at no cost in speed)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        out = model(x[i : i + batch_size])
        total_loss += nn.functional.cross_entropy(out, y[i : i + batch_size], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + batch_size]).sum().item()
    model.train(was_training)
    n = max(1, len(y))
    return total_loss / n, correct / n


class Training(ABC):
    """Runs one round of local optimisation of `model` on a node's shard."""

    def __init__(self, cfg, model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, seed: int):
        self.cfg = cfg
        self.model = model
        self.x, self.y = train_x, train_y
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The configured optimizer (``optimizer`` section) over `params`: what a node that
        trains several modules (a split node's replicas) gives each of them."""
        return build_optimizer(self.cfg.optimizer, params)

    def make_sampler(self, drop_last: bool = True) -> BatchSampler:
        """A sampler of this node's shard drawing the batches this training's own sampler
        draws (same seed), for a node that runs the steps itself (split learning);
        ``drop_last=False``: every sample once per pass."""
        return BatchSampler(len(self.y), self.cfg.training.batch_size, torch.Generator().manual_seed(self.seed),
                            drop_last=drop_last)

    @abstractmethod
    def train(self) -> float:
        """Train for one round; return the mean training loss."""

    def state_dict(self) -> dict:
        """What training needs to go on exactly where it stopped (optimizer, sampler, RNG)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
