"""Federated server optimizers: how the server turns this round's aggregate into the next global model.

The server treats Δ = aggregate − global (the sample-weighted average of the clients' models
minus the model it sent them) as a pseudo-gradient and takes one optimizer step with it:

* ``fedavg``: x ← x + η·Δ; with η = 1 this is plain FedAvg (x ← aggregate).
* ``fedavgm``: server momentum (Hsu et al., "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", 2019): m ← β·m + Δ; x ← x + η·m.
* ``fedadagrad``, ``fedyogi``, ``fedadam``: Reddi et al., "Adaptive Federated Optimization"
  (ICLR 2021), Algorithm 2, with m ← β1·m + (1−β1)·Δ and x ← x + η·m / (√v + τ), where
  - fedadagrad: v ← v + Δ²
  - fedyogi:    v ← v − (1−β2)·Δ²·sign(v − Δ²)
  - fedadam:    v ← β2·v + (1−β2)·Δ²

All rules are element-wise. State starts at m₀ = 0 and v₀ = τ²: the paper only asks for
v₋₁ ≥ τ², and τ² is the smallest value allowed. There is no bias correction (the paper has
none), so the first adaptive steps are damped by (1−β1) in m.

Defaults of :func:`build_server_optimizer`: η = 1 for fedavg; η = 1 − β for fedavgm (an
effective step η/(1−β) of 1, FedAvg's); η = 0.1 for fedadagrad and 0.01 for fedadam and fedyogi, inside
the range of server learning rates that Reddi et al. report as best across tasks (about
10⁻² to 1), and the best of {0.1, 0.01} for each on digits (10 clients, fraction 0.5);
β = 0.9 for fedavgm; β1 = 0.9 and β2 = 0.99 as in the paper's experiments; τ = 10⁻³, a value
from the grid the paper tunes τ over.

Floating-point tensors are updated in float64 when stored as float64 and in float32
otherwise, and returned in their own dtype. Non-floating tensors (counters such as
BatchNorm's ``num_batches_tracked``) take the aggregate's value unchanged.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from ..registry import Registry

TensorDict = Mapping[str, torch.Tensor]

SERVER_OPTIMIZERS: Registry[type["ServerOptimizer"]] = Registry("server optimizer")


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: the server learning rate must be a finite number > 0, got {lr}")
    return lr


def _check_beta(name: str, beta: float) -> float:
    beta = float(beta)
    if not 0 <= beta < 1:
        raise ValueError(f"{name}: must be in [0, 1), got {beta}")
    return beta


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau: the adaptivity must be a finite number > 0, got {tau}")
    return tau


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class ServerOptimizer:
    """One optimizer step per round on the global model, with Δ = aggregate − global as the
    pseudo-gradient. Subclasses implement :meth:`_update` for one tensor; state (m, v) is
    kept per tensor name across calls of :meth:`step`."""

    #: server learning rate used when none is given
    default_lr: float = 1.0

    def __init__(self, lr: Optional[float] = None):
        self.lr = _check_lr(self.default_lr if lr is None else lr)
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.rounds = 0

    def step(self, global_: TensorDict, aggregate: TensorDict) -> dict[str, torch.Tensor]:
        """The new global model from the current one and this round's (sample-weighted)
        aggregate of the clients' models: same names, shapes and dtypes as `global_`.
        Neither input is modified."""
        if set(global_) != set(aggregate):
            missing, extra = sorted(set(global_) - set(aggregate)), sorted(set(aggregate) - set(global_))
            raise ValueError(f"aggregate does not match the global model: missing {missing}, unexpected {extra}")
        out = {}
        for name, x in global_.items():
            a = aggregate[name]
            if a.shape != x.shape:
                raise ValueError(f"{name}: aggregate has shape {tuple(a.shape)}, global model {tuple(x.shape)}")
            if not x.is_floating_point():
                out[name] = a.to(dtype=x.dtype, device=x.device, copy=True)
                continue
            dt = _work_dtype(x)
            xw, aw = x.to(dt), a.to(device=x.device, dtype=dt)
            new = self._update(self.state.setdefault(name, {}), xw, aw)
            out[name] = new.to(x.dtype)
        self.rounds += 1
        return out

    def _update(self, state: dict[str, torch.Tensor], x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The new value of one tensor `x` (work dtype) given its aggregate `a`; `state` is
        this tensor's mutable state dict."""
        raise NotImplementedError


@SERVER_OPTIMIZERS.register("fedavg")
class FedAvg(ServerOptimizer):
    """x ← x + η·Δ (η = 1: the aggregate itself). Computed as (1−η)·x + η·aggregate, which
    returns the aggregate exactly when η = 1."""

    default_lr = 1.0

    def _update(self, state, x, a):
        if self.lr == 1.0:
            return a.clone()
        return x * (1.0 - self.lr) + a * self.lr


@SERVER_OPTIMIZERS.register("fedavgm")
class FedAvgM(ServerOptimizer):
    """Server momentum: m ← β·m + Δ; x ← x + η·m, m₀ = 0. The default η is 1 − β, so the
    effective step η/(1−β) is FedAvg's (with η = 1 and β = 0.9 the steps grow tenfold and
    FedAvgM diverged on digits)."""

    def __init__(self, lr: Optional[float] = None, momentum: float = 0.9):
        self.momentum = _check_beta("momentum", momentum)
        super().__init__(1.0 - self.momentum if lr is None else lr)

    def _update(self, state, x, a):
        delta = a - x
        m = state.get("m")
        m = delta if m is None else m.mul_(self.momentum).add_(delta)
        state["m"] = m
        return x + self.lr * m


class _Adaptive(ServerOptimizer):
    """Reddi et al.'s Algorithm 2: m ← β1·m + (1−β1)·Δ; v by the subclass' rule;
    x ← x + η·m / (√v + τ); m₀ = 0, v₀ = τ², no bias correction."""

    default_lr = 0.1

    def __init__(self, lr: Optional[float] = None, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(lr)
        self.beta1 = _check_beta("beta1", beta1)
        self.beta2 = _check_beta("beta2", beta2)
        self.tau = _check_tau(tau)

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """The updated v (may work in place on `v`)."""
        raise NotImplementedError

    def _update(self, state, x, a):
        delta = a - x
        if "m" not in state:
            state["m"] = torch.zeros_like(x)
            state["v"] = torch.full_like(x, self.tau**2)
        m = state["m"].mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        v = state["v"] = self._second_moment(state["v"], delta * delta)
        return x + self.lr * m / (v.sqrt() + self.tau)


@SERVER_OPTIMIZERS.register("fedadagrad")
class FedAdagrad(_Adaptive):
    """v ← v + Δ² (β2 is not used)."""

    def _second_moment(self, v, delta_sq):
        return v.add_(delta_sq)


@SERVER_OPTIMIZERS.register("fedyogi")
class FedYogi(_Adaptive):
    """v ← v − (1−β2)·Δ²·sign(v − Δ²)."""

    default_lr = 0.01

    def _second_moment(self, v, delta_sq):
        return v - (1.0 - self.beta2) * delta_sq * torch.sign(v - delta_sq)


@SERVER_OPTIMIZERS.register("fedadam")
class FedAdam(_Adaptive):
    """v ← β2·v + (1−β2)·Δ²."""

    default_lr = 0.01

    def _second_moment(self, v, delta_sq):
        return v.mul_(self.beta2).add_(delta_sq, alpha=1.0 - self.beta2)


def build_server_optimizer(name: str, lr: Optional[float] = None, momentum: float = 0.9, beta1: float = 0.9,
                           beta2: float = 0.99, tau: float = 1e-3) -> ServerOptimizer:
    """The server optimizer registered as `name`, given the hyper-parameters it uses (the
    others are ignored). `lr` None: the optimizer's default (1.0 for fedavg, 1 − momentum
    for fedavgm, 0.1 for fedadagrad, 0.01 for fedyogi and fedadam). An unknown name raises the registry's
    KeyError; a bad hyper-parameter a ValueError that names it."""
    cls = SERVER_OPTIMIZERS.get(name)
    if issubclass(cls, _Adaptive):
        return cls(lr, beta1=beta1, beta2=beta2, tau=tau)
    if issubclass(cls, FedAvgM):
        return cls(lr, momentum=momentum)
    return cls(lr)
