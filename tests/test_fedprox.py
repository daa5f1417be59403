"""FedProx: mu = 0 is local SGD, one step matches a hand-computed proximal step, large mu stays near w₀."""

from types import SimpleNamespace

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from dflsplit.registry import bounds_text
from dflsplit.training.base import TRAININGS, BatchSampler
from dflsplit.training.fedprox import FedProx, FedProxKeys
from dflsplit.training.local_sgd import LocalSGD

SEED = 5


def digits(n=300, dtype=torch.float32):
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=dtype), torch.tensor(y[:n], dtype=torch.long)


def make_cfg(mu, lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=16, local_steps=5):
    # the attributes LocalSGD and build_optimizer read, plus fedprox's mu
    return SimpleNamespace(
        optimizer=SimpleNamespace(name="sgd", lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False),
        training=SimpleNamespace(batch_size=batch_size, local_steps=local_steps, local_epochs=None, mu=mu),
    )


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Linear(64, 10).to(dtype)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_registered_with_its_keys():
    assert TRAININGS.get("fedprox") is FedProx
    assert TRAININGS.keys_of("fedprox") is FedProxKeys
    (f,) = FedProxKeys.__dataclass_fields__.values()
    assert f.name == "mu" and f.default == 0.01 and bounds_text(f) == ">= 0"


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 1e-3)])
def test_mu_zero_is_local_sgd(momentum, weight_decay):
    x, y = digits()
    cfg = make_cfg(0.0, momentum=momentum, weight_decay=weight_decay)
    a, b = make_model(), make_model()
    prox, sgd = FedProx(cfg, a, x, y, SEED), LocalSGD(cfg, b, x, y, SEED)
    for _ in range(3):  # several rounds: optimizer state and sampler carry over alike
        assert prox.train() == sgd.train()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_steps_match_hand_computed_proximal_sgd():
    """w ← w − lr·(∇data + mu·(w − w₀)), w₀ the weights at the start of the round. The first
    step has w = w₀ (no pull), so three steps are checked; the loss is the data losses' mean."""
    lr, mu, steps, bs = 0.2, 0.7, 3, 16
    x, y = digits(dtype=torch.float64)
    model = make_model(torch.float64)
    w0 = [p.detach().clone() for p in model.parameters()]
    prox = FedProx(make_cfg(mu, lr=lr, batch_size=bs, local_steps=steps), model, x, y, SEED)

    # the same batches: a sampler on a generator seeded alike
    sampler = BatchSampler(len(y), bs, torch.Generator().manual_seed(SEED))
    ref = make_model(torch.float64)  # a copy of the initial weights
    w = [p.detach().clone() for p in ref.parameters()]
    data_losses = []
    for _ in range(steps):
        idx = sampler.next()
        for p, wi in zip(ref.parameters(), w):
            p.data.copy_(wi)
        loss = nn.functional.cross_entropy(ref(x[idx]), y[idx])
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        w = [wi - lr * (g + mu * (wi - w0i)) for wi, g, w0i in zip(w, grads, w0)]
        data_losses.append(loss.item())

    got = prox.train()
    for p, wi in zip(model.parameters(), w):
        torch.testing.assert_close(p.detach(), wi, rtol=0, atol=1e-6)
    assert got == pytest.approx(sum(data_losses) / steps, abs=1e-9)
    # and the pull is really there: plain SGD lands elsewhere
    sgd_model = make_model(torch.float64)
    LocalSGD(make_cfg(0.0, lr=lr, batch_size=bs, local_steps=steps), sgd_model, x, y, SEED).train()
    assert (flat(sgd_model) - flat(model)).abs().max() > 1e-4


def test_anchor_is_the_model_at_the_start_of_each_round():
    """Round 2's w₀ is round 2's starting model (e.g. a new global model), not round 1's."""
    x, y = digits(dtype=torch.float64)
    lr, mu = 0.2, 0.7
    cfg = make_cfg(mu, lr=lr, local_steps=2)
    model = make_model(torch.float64)
    prox = FedProx(cfg, model, x, y, SEED)
    prox.train()
    with torch.no_grad():  # the "server" replaces the model between rounds
        for p in model.parameters():
            p.mul_(0.5)
    start = [p.detach().clone() for p in model.parameters()]
    # a FedProx whose first round starts from the same weights and sampler position
    twin_model = make_model(torch.float64)
    twin = FedProx(cfg, twin_model, x, y, SEED)
    twin.sampler.next(), twin.sampler.next()  # skip round 1's batches
    with torch.no_grad():
        for p, s in zip(twin_model.parameters(), start):
            p.copy_(s)
    prox.train(), twin.train()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_large_mu_stays_closer_to_the_start():
    x, y = digits()
    lr, steps = 0.5, 40
    w0 = flat(make_model())
    dist = {}
    for name, mu in [("local_sgd", 0.0), ("fedprox", 1.0)]:
        model = make_model()
        cls = LocalSGD if name == "local_sgd" else FedProx
        cls(make_cfg(mu, lr=lr, local_steps=steps), model, x, y, SEED).train()
        dist[name] = (flat(model) - w0).norm().item()
    assert dist["fedprox"] < 0.5 * dist["local_sgd"], dist


def test_negative_mu_is_an_error():
    x, y = digits(50)
    with pytest.raises(ValueError, match="training.mu"):
        FedProx(make_cfg(-0.1), make_model(), x, y, SEED)
