import pytest
import torch

from dflsplit.config import load_config
from dflsplit.models import build_model
from dflsplit.sharing import SHARINGS, weighted_average
from dflsplit.sharing.base import shared_state
from dflsplit.training import TRAININGS, BatchSampler, evaluate


def blobs(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    centers = torch.randn(4, 1, 8, 8, generator=g) * 2
    x = centers[y] + 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    return x, y


def test_local_sgd_lowers_loss_and_raises_accuracy():
    cfg = load_config(None, ["training.local_steps=30", "training.batch_size=16", "optimizer.lr=0.05"])
    x, y = blobs()
    model = build_model(cfg.model, (1, 8, 8), 4, seed=0)
    before = evaluate(model, x, y)
    trainer = TRAININGS.get("local_sgd")(cfg, model, x, y, seed=0)
    losses = [trainer.train() for _ in range(3)]
    after = evaluate(model, x, y)
    assert losses[-1] < losses[0]
    assert after[0] < before[0] and after[1] > max(0.9, before[1])


def test_local_epochs_counts_steps():
    cfg = load_config(None, ["training.local_steps=null", "training.local_epochs=2", "training.batch_size=32"])
    x, y = blobs(100)
    trainer = TRAININGS.get("local_sgd")(cfg, build_model(cfg.model, (1, 8, 8), 4, seed=0), x, y, seed=0)
    assert trainer.steps == 7  # ceil(2 * 100 / 32)


def test_batch_sampler_covers_each_pass_and_is_deterministic():
    a = BatchSampler(10, 5, torch.Generator().manual_seed(1))
    b = BatchSampler(10, 5, torch.Generator().manual_seed(1))
    first = torch.cat([a.next(), a.next()])
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(first, torch.cat([b.next(), b.next()]))


def test_weighted_average_is_exact():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16)}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([3.0], dtype=torch.float16)}
    out = weighted_average([a, b], [0.25, 0.75])
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0])) and out["h"].dtype == torch.float16
    with pytest.raises(ValueError, match="one weight per model"):
        weighted_average([a], [0.5, 0.5])


def test_full_sharing_aggregate_replaces_floats_keeps_int_buffers():
    cfg = load_config(None)
    share = SHARINGS.get("full")(cfg, 0)
    m1 = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    m2 = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    m1[1].num_batches_tracked.fill_(7)
    own, other = shared_state(m1), shared_state(m2)
    assert "1.num_batches_tracked" not in own
    expected = {k: 0.5 * own[k] + 0.5 * other[k] for k in own}
    share.aggregate(m1, {k: v.clone() for k, v in own.items()}, {5: other}, {0: 0.5, 5: 0.5}, self_id=0)
    for k, v in m1.state_dict().items():
        if k in expected:
            assert torch.allclose(v, expected[k])
    assert m1[1].num_batches_tracked.item() == 7
