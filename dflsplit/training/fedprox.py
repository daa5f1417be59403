"""`fedprox`: local SGD with a proximal term that keeps the model near the one it received.

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020): each local step
minimises data loss + (mu/2)·||w − w₀||², where w₀ is the model at the start of the round
(in federated learning, the global model the client received). mu = 0 is local SGD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import key
from .base import TRAININGS
from .local_sgd import LocalSGD


@dataclass
class FedProxKeys:
    """Keys of training `fedprox`."""

    mu: float = key(0.01, "weight of the proximal term (mu/2)·||w − w_round_start||²", ge=0)


@TRAININGS.register("fedprox", keys=FedProxKeys)
class FedProx(LocalSGD):
    """Local SGD on data loss + (mu/2)·Σ||w − w₀||², with w₀ the parameters at the start of
    each :meth:`train` call and mu read from ``cfg.training.mu``. Batches, optimizer and step
    count are LocalSGD's, so mu = 0 trains exactly as ``local_sgd`` does."""

    def __init__(self, cfg, model, train_x, train_y, seed):
        super().__init__(cfg, model, train_x, train_y, seed)
        self.mu = float(cfg.training.mu)
        if not self.mu >= 0:
            raise ValueError(f"training.mu: must be >= 0, got {cfg.training.mu!r}")

    def begin_round(self) -> None:
        # w₀: detached copies of the parameters as received this round
        self.anchor = [(p, p.detach().clone()) for p in self.model.parameters() if p.requires_grad]

    def penalty(self) -> torch.Tensor | None:
        """(mu/2)·Σ||w − w₀||² over the trainable parameters (differentiable in w); the
        reported loss stays the data loss, so it compares with local_sgd's."""
        if not (self.mu > 0 and self.anchor):
            return None
        return 0.5 * self.mu * sum(((p - p0) ** 2).sum() for p, p0 in self.anchor)
