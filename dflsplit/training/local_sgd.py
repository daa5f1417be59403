"""`local_sgd`: a fixed number of mini-batch steps (or epochs) of the configured optimizer."""

from __future__ import annotations

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

    def train(self) -> float:
        self.model.train()
        total = 0.0
        for _ in range(self.steps):
            idx = self.sampler.next()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(self.x[idx]), self.y[idx])
            loss.backward()
            self.optimizer.step()
            total += loss.item()
        return total / self.steps
