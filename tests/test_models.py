import pytest
import torch
from torch import nn

from dflsplit.config import ModelConfig, section_from_dict
from dflsplit.models import MODELS, build_model, cut_sequential


@pytest.mark.parametrize("name", ["cnn", "lenet", "mlp"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_models_build_for_each_input_shape(name, shape):
    model = build_model(ModelConfig(name=name), shape, 10, seed=0)
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    declared = MODELS.get(name).num_partitions
    assert model.num_partitions == (declared or 1)


def test_declared_partitions_and_their_composition():
    cnn = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10, seed=0)
    assert len(cnn.partitions()) == 4
    assert isinstance(cnn[2][0], nn.Flatten) and isinstance(cnn[3], nn.Linear)
    x = torch.randn(2, 1, 8, 8)
    h = x
    for part in cnn.partitions():
        h = part(h)
    assert torch.allclose(h, cnn(x))


def test_resnet18_has_ten_partitions_and_runs_on_32x32():
    model = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10, seed=0)
    assert model.num_partitions == 10 == MODELS.get("resnet18").num_partitions
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mlp_partitions_as_configured_and_too_many_is_an_error():
    model = build_model(section_from_dict("model", name="mlp", hidden=[32, 16, 8], partitions=3), (1, 8, 8), 10, seed=0)
    assert model.num_partitions == 3
    with pytest.raises(ValueError, match="model.partitions=9"):
        build_model(section_from_dict("model", name="mlp", hidden=[8], partitions=9), (1, 8, 8), 10)


def test_seed_makes_weights_deterministic():
    a = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10, seed=3)
    b = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10, seed=3)
    c = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10, seed=4)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_cut_sequential_is_contiguous_and_balanced():
    layers = [nn.Linear(10, 10) for _ in range(8)]  # equal cost
    parts = cut_sequential(layers, 4)
    assert [len(p) for p in parts] == [2, 2, 2, 2]
    assert [m for p in parts for m in p] == layers
    heavy = [nn.Linear(100, 100), nn.ReLU(), nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 10)]
    parts = cut_sequential(heavy, 2)
    assert len(parts[0]) == 1  # the heavy layer alone
    with pytest.raises(ValueError, match="cannot cut 5 layers into 6"):
        cut_sequential(heavy, 6)


def test_unknown_model_lists_known_ones():
    with pytest.raises(KeyError, match="unknown model 'cnnn' \\(did you mean 'cnn'\\?\\); known: cnn, lenet, mlp, resnet18"):
        build_model(ModelConfig(name="cnnn"), (1, 8, 8), 10)
