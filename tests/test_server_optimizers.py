"""Server optimizers against an independent NumPy transcription of each update rule."""

import numpy as np
import pytest
import torch

from dflsplit.sharing.aggregators import weighted_average
from dflsplit.sharing.server_optimizers import SERVER_OPTIMIZERS, build_server_optimizer

NAMES = ["fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam"]
SHAPES = {"conv.weight": (3, 2, 2), "fc.weight": (4, 5), "fc.bias": (4,), "scale": ()}
CLIENT_SAMPLES = [10.0, 35.0, 5.0, 50.0]  # unequal: the aggregate is a weighted average
ROUNDS = 5
HP = dict(lr=0.3, momentum=0.8, beta1=0.85, beta2=0.95, tau=1e-2)


def numpy_reference(name, x, aggregates, lr, momentum, beta1, beta2, tau):
    """The global model after each round, by the rules written out in NumPy (float64)."""
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(val, tau**2) for k, val in x.items()}
    history = []
    for agg in aggregates:
        new = {}
        for k in x:
            d = agg[k] - x[k]
            if name == "fedavg":
                new[k] = x[k] + lr * d
                continue
            if name == "fedavgm":
                m[k] = momentum * m[k] + d
                new[k] = x[k] + lr * m[k]
                continue
            m[k] = beta1 * m[k] + (1 - beta1) * d
            if name == "fedadagrad":
                v[k] = v[k] + d**2
            elif name == "fedyogi":
                v[k] = v[k] - (1 - beta2) * d**2 * np.sign(v[k] - d**2)
            elif name == "fedadam":
                v[k] = beta2 * v[k] + (1 - beta2) * d**2
            new[k] = x[k] + lr * m[k] / (np.sqrt(v[k]) + tau)
        x = new
        history.append(x)
    return history


def draw(seed=0):
    """The initial global model and each round's client models (fixed, independent of the global)."""
    rng = np.random.default_rng(seed)
    x0 = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    clients = [
        [{k: rng.normal(loc=0.2 * t, scale=1.0 + 0.5 * i, size=s) for k, s in SHAPES.items()}
         for i in range(len(CLIENT_SAMPLES))]
        for t in range(ROUNDS)
    ]
    return x0, clients


def np_weighted_average(models, samples):
    total = sum(samples)
    return {k: sum(n * mdl[k] for mdl, n in zip(models, samples)) / total for k in models[0]}


def to_torch(d):
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float64).copy()) for k, v in d.items()}


@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_transcription_over_five_rounds(name):
    x0, clients = draw()
    np_aggs = [np_weighted_average(round_clients, CLIENT_SAMPLES) for round_clients in clients]
    expected = numpy_reference(name, x0, np_aggs, **HP)

    opt = build_server_optimizer(name, **HP)
    weights = [n / sum(CLIENT_SAMPLES) for n in CLIENT_SAMPLES]
    x = to_torch(x0)
    for t, round_clients in enumerate(clients):
        agg = weighted_average([to_torch(c) for c in round_clients], weights)
        for k in SHAPES:  # the torch aggregate is the numpy one
            np.testing.assert_allclose(agg[k].numpy(), np_aggs[t][k], rtol=0, atol=1e-12)
        x = opt.step(x, agg)
        for k, shape in SHAPES.items():
            assert x[k].dtype == torch.float64 and tuple(x[k].shape) == shape
            np.testing.assert_allclose(x[k].numpy(), expected[t][k], rtol=0, atol=1e-6,
                                       err_msg=f"{name}, round {t + 1}, {k}")


@pytest.mark.parametrize("name", NAMES)
def test_float32_in_float32_out_and_inputs_untouched(name):
    x0, clients = draw(1)
    x = {k: v.float() for k, v in to_torch(x0).items()}
    x["steps"] = torch.tensor(7, dtype=torch.int64)  # a non-float buffer takes the aggregate's value
    agg = {k: v.float() for k, v in to_torch(np_weighted_average(clients[0], CLIENT_SAMPLES)).items()}
    agg["steps"] = torch.tensor(9, dtype=torch.int64)
    x_before = {k: v.clone() for k, v in x.items()}
    agg_before = {k: v.clone() for k, v in agg.items()}
    out = build_server_optimizer(name, **HP).step(x, agg)
    expected = numpy_reference(name, x0, [np_weighted_average(clients[0], CLIENT_SAMPLES)], **HP)[0]
    for k in SHAPES:
        assert out[k].dtype == torch.float32
        np.testing.assert_allclose(out[k].numpy(), expected[k], rtol=0, atol=1e-5)
    assert out["steps"].dtype == torch.int64 and out["steps"].item() == 9
    for k in x:
        assert torch.equal(x[k], x_before[k]) and torch.equal(agg[k], agg_before[k])


def test_fedavg_with_lr_one_returns_the_aggregate_exactly():
    x0, clients = draw(2)
    x, agg = to_torch(x0), to_torch(np_weighted_average(clients[0], CLIENT_SAMPLES))
    opt = build_server_optimizer("fedavg")
    assert opt.lr == 1.0
    for _ in range(2):
        out = opt.step(x, agg)
        for k in SHAPES:
            assert torch.equal(out[k], agg[k])
        x = out
    out32 = build_server_optimizer("fedavg", lr=1).step(
        {k: v.float() for k, v in x.items()}, {k: v.float() for k, v in agg.items()})
    assert all(torch.equal(out32[k], agg[k].float()) for k in SHAPES)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_state_persists_across_rounds(name):
    x0, clients = draw(3)
    x, agg = to_torch(x0), to_torch(np_weighted_average(clients[0], CLIENT_SAMPLES))
    opt = build_server_optimizer(name)
    x1 = opt.step(x, agg)
    agg2 = to_torch(np_weighted_average(clients[1], CLIENT_SAMPLES))
    second = opt.step(x1, agg2)
    fresh = build_server_optimizer(name).step(x1, agg2)
    assert any(not torch.allclose(second[k], fresh[k], rtol=0, atol=1e-9) for k in SHAPES)


def test_defaults():
    assert build_server_optimizer("fedavg").lr == 1.0
    assert build_server_optimizer("fedavgm").lr == pytest.approx(0.1)  # 1 - momentum
    assert build_server_optimizer("fedavgm").momentum == 0.9
    for name, lr in [("fedadagrad", 0.1), ("fedyogi", 0.01), ("fedadam", 0.01)]:
        opt = build_server_optimizer(name)
        assert (opt.lr, opt.beta1, opt.beta2, opt.tau) == (lr, 0.9, 0.99, 1e-3)
    assert sorted(NAMES) == SERVER_OPTIMIZERS.names()


def test_unknown_name_is_the_registry_error():
    with pytest.raises(KeyError, match="unknown server optimizer 'fedadamw'.*fedadam"):
        build_server_optimizer("fedadamw")


@pytest.mark.parametrize(
    "name, kwargs, param",
    [
        ("fedavg", dict(lr=0), "lr"),
        ("fedadam", dict(lr=-0.1), "lr"),
        ("fedyogi", dict(lr=float("nan")), "lr"),
        ("fedavgm", dict(momentum=1.0), "momentum"),
        ("fedavgm", dict(momentum=-0.1), "momentum"),
        ("fedadam", dict(beta1=1.0), "beta1"),
        ("fedyogi", dict(beta2=1.5), "beta2"),
        ("fedadagrad", dict(beta1=-0.5), "beta1"),
        ("fedadam", dict(tau=0), "tau"),
        ("fedyogi", dict(tau=-1e-3), "tau"),
    ],
)
def test_bad_hyper_parameters_name_the_parameter(name, kwargs, param):
    with pytest.raises(ValueError, match=rf"^{param}:"):
        build_server_optimizer(name, **kwargs)


def test_mismatched_aggregate_is_an_error():
    x = {"a": torch.zeros(3), "b": torch.zeros(2)}
    opt = build_server_optimizer("fedadam")
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        opt.step(x, {"a": torch.ones(3)})
    with pytest.raises(ValueError, match="b: aggregate has shape"):
        opt.step(x, {"a": torch.ones(3), "b": torch.ones(3)})
