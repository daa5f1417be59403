"""`local_sgd`: a fixed number of mini-batch steps (or epochs) of the configured optimizer."""

from __future__ import annotations

import torch
from torch import nn

from .base import TRAININGS, BatchSampler, Training, build_optimizer


@TRAININGS.register("local_sgd")
class LocalSGD(Training):
    """`training.local_steps` mini-batches, or `training.local_epochs` passes, per round."""

    def __init__(self, cfg, model, train_x, train_y, seed):
        super().__init__(cfg, model, train_x, train_y, seed)
        self.optimizer = build_optimizer(cfg.optimizer, model.parameters())
        self.sampler = BatchSampler(len(train_y), cfg.training.batch_size, self.generator)
        t = cfg.training
        self.steps = t.local_steps if t.local_steps is not None else self.sampler.steps_for_epochs(t.local_epochs)
        self.loss_fn = nn.CrossEntropyLoss()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])

    def begin_round(self) -> None:
        """Called at the start of every `train`, before the first step (a hook for subclasses)."""

    def penalty(self) -> torch.Tensor | None:
        """A term added to each step's objective (not to the reported loss); None: none."""
        return None

    def train(self) -> float:
        """Train for one round; return the mean of the steps' data losses."""
        self.model.train()
        self.begin_round()
        total = 0.0
        for _ in range(self.steps):
            idx = self.sampler.next()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(self.x[idx]), self.y[idx])
            extra = self.penalty()
            (loss if extra is None else loss + extra).backward()
            self.optimizer.step()
            total += loss.item()
        return total / self.steps
