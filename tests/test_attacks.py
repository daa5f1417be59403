"""Byzantine attacks: each against its defining property, computed independently (NumPy)."""

import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch

from dflsplit.sharing import attacks as A
from dflsplit.sharing.aggregators import AGGREGATORS, aggregate_vectors
from dflsplit.sharing.attacks import ATTACKS, DATA_ATTACKS, alie_z, craft, flip_labels

D = 7
NAMES = {"none", "sign_flip", "alie", "ipm", "gaussian", "inf", "nan", "mimic", "label_flip"}


def vectors(k, d=D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    own = torch.randn(d, generator=g, dtype=dtype)
    honest = 1.0 + 0.3 * torch.randn(k, d, generator=g, dtype=dtype)
    return own, honest


def rng(seed=1):
    return torch.Generator().manual_seed(seed)


def test_registered_names_and_signatures():
    assert set(ATTACKS.names()) == NAMES
    assert DATA_ATTACKS == {"label_flip"}
    for name in ATTACKS.names():
        params = inspect.signature(ATTACKS.get(name)).parameters
        assert list(params)[:5] == list(A.ARGUMENTS), name
        cls = ATTACKS.keys_of(name)
        fields = {fl.name: fl for fl in dataclasses.fields(cls)} if cls else {}
        assert not set(fields) & set(A.ARGUMENTS), name  # keys never shadow the arguments
        # the keys are exactly the keyword-only parameters, with the same defaults
        kw = {p.name: p.default for p in params.values() if p.kind is p.KEYWORD_ONLY}
        assert kw == {k: fl.default for k, fl in fields.items()}, name


@pytest.mark.parametrize("name", sorted(NAMES))
@pytest.mark.parametrize("k", [0, 1, 5])
def test_shape_dtype_and_purity(name, k):
    for dtype in (torch.float32, torch.float64):
        own, honest = vectors(k, dtype=dtype)
        own0, honest0 = own.clone(), honest.clone()
        out = craft(name, own, honest, rng(), 10, 2, {})
        assert out.shape == own.shape and out.dtype == own.dtype
        assert out.data_ptr() != own.data_ptr()  # never the caller's tensor itself
        assert torch.equal(own, own0) and torch.equal(honest, honest0)


def test_sign_flip():
    own, honest = vectors(6)
    mean = honest.numpy().mean(0)
    np.testing.assert_allclose(craft("sign_flip", own, honest, rng(), 10, 2, {}).numpy(), -4.0 * mean, rtol=1e-12)
    np.testing.assert_allclose(craft("sign_flip", own, honest, rng(), 10, 2, {"scale": 2.5}).numpy(), -2.5 * mean,
                               rtol=1e-12)


def test_ipm():
    own, honest = vectors(6)
    mean = honest.numpy().mean(0)
    np.testing.assert_allclose(craft("ipm", own, honest, rng(), 10, 2, {}).numpy(), -0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(craft("ipm", own, honest, rng(), 10, 2, {"epsilon": 0.5}).numpy(), -0.5 * mean,
                               rtol=1e-12)


def test_alie_default_z_from_n_and_f():
    # n = 10, f = 2: s = ⌊10/2 + 1⌋ − 2 = 4 supporters, z = Φ⁻¹((10 − 4)/10) = Φ⁻¹(0.6)
    z = 0.2533471031357997
    assert A.alie_z(10, 2) == pytest.approx(z, abs=1e-12)
    own, honest = vectors(8)
    h = honest.numpy()
    want = h.mean(0) - z * h.std(0, ddof=1)  # sample std (Bessel)
    np.testing.assert_allclose(craft("alie", own, honest, rng(), 10, 2, {}).numpy(), want, rtol=1e-10)


def test_alie_explicit_z_and_bad_n_f():
    own, honest = vectors(8)
    h = honest.numpy()
    want = h.mean(0) - 1.5 * h.std(0, ddof=1)
    # an explicit z wins; n and f are then not used (even invalid ones)
    np.testing.assert_allclose(craft("alie", own, honest, rng(), 1, 0, {"z": 1.5}).numpy(), want, rtol=1e-10)
    for n, f in [(10, 6), (1, 0), (0, 0), (4, 5)]:  # z_max undefined or nonsense counts
        with pytest.raises(ValueError):
            craft("alie", own, honest, rng(), n, f, {})


def test_gaussian_seeded_and_std():
    own, honest = vectors(4, d=200_000)
    mean = honest.mean(0)
    a = craft("gaussian", own, honest, rng(7), 10, 2, {"sigma": 0.5})
    b = craft("gaussian", own, honest, rng(7), 10, 2, {"sigma": 0.5})
    c = craft("gaussian", own, honest, rng(8), 10, 2, {"sigma": 0.5})
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = (a - mean).numpy()
    assert abs(noise.mean()) < 0.01 and noise.std() == pytest.approx(0.5, rel=0.01)
    pure = craft("gaussian", own, honest, rng(7), 10, 2, {"sigma": 0.5, "around_mean": False}).numpy()
    np.testing.assert_allclose(pure, noise, atol=1e-12)  # same draw, without the mean
    assert abs(pure.mean()) < 0.01 and pure.std() == pytest.approx(0.5, rel=0.01)
    default = craft("gaussian", own, honest, rng(7), 10, 2, {})
    assert (default - mean).numpy().std() == pytest.approx(1.0, rel=0.01)


def test_inf_and_nan():
    own, honest = vectors(3)
    out = craft("inf", own, honest, rng(), 10, 2, {})
    assert torch.isinf(out).all() and (out > 0).all()
    assert torch.isnan(craft("nan", own, honest, rng(), 10, 2, {})).all()


def test_mimic_copies():
    own, honest = vectors(4)
    assert torch.equal(craft("mimic", own, honest, rng(), 10, 2, {}), honest[0])
    assert torch.equal(craft("mimic", own, honest, rng(), 10, 2, {"target": 2}), honest[2])
    assert torch.equal(craft("mimic", own, honest, rng(), 10, 2, {"target": 5}), honest[1])  # wraps mod k


def test_none_and_label_flip_send_own():
    own, honest = vectors(4)
    for name in ("none", "label_flip"):
        assert torch.equal(craft(name, own, honest, rng(), 10, 2, {}), own)


@pytest.mark.parametrize("empty", [torch.zeros(0, D, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)])
def test_no_honest_rows_fall_back_to_own(empty):
    own, _ = vectors(0)
    o = own.numpy()
    np.testing.assert_allclose(craft("sign_flip", own, empty, rng(), 10, 2, {}).numpy(), -4.0 * o)
    np.testing.assert_allclose(craft("ipm", own, empty, rng(), 10, 2, {}).numpy(), -0.1 * o)
    assert torch.equal(craft("alie", own, empty, rng(), 10, 2, {}), own)  # std 0
    assert torch.equal(craft("mimic", own, empty, rng(), 10, 2, {"target": 3}), own)
    noise = craft("gaussian", own, empty, rng(3), 10, 2, {}) - own
    assert torch.allclose(noise, torch.randn(D, generator=rng(3), dtype=own.dtype), atol=1e-12)


def test_alie_single_honest_row_estimates_with_own():
    own, honest = vectors(1)
    both = torch.stack([own, honest[0]])
    expected = both.mean(0) - alie_z(10, 2) * both.std(0, correction=1)
    assert torch.allclose(craft("alie", own, honest, rng(), 10, 2, {}), expected)
    assert torch.equal(craft("alie", own, honest[:0], rng(), 10, 2, {}), own)


def test_bad_shapes():
    own, honest = vectors(3)
    with pytest.raises(ValueError):
        craft("sign_flip", own, honest[:, :-1], rng(), 10, 2, {})
    with pytest.raises(ValueError):
        craft("none", own[None], honest, rng(), 10, 2, {})


def test_flip_labels():
    y = torch.arange(10)
    assert torch.equal(flip_labels(y, 10), torch.arange(9, -1, -1))
    assert flip_labels(torch.tensor([0]), 10).item() == 9 and flip_labels(torch.tensor([9]), 10).item() == 0
    z = torch.randint(0, 10, (100,), generator=rng())
    assert torch.equal(flip_labels(flip_labels(z, 10), 10), z)
    assert flip_labels(z, 10).dtype == z.dtype
    with pytest.raises(ValueError):
        flip_labels(torch.tensor([10]), 10)


def test_craft_passes_only_declared_keys(monkeypatch):
    own, honest = vectors(5)
    everything = {"scale": 2.0, "epsilon": 0.5, "z": 1.0, "sigma": 3.0, "target": 1, "f": 99,
                  "aggregator": "trimmed_mean"}
    # rules without keys would fail on any unexpected keyword: craft filters them out
    for name in ATTACKS.names():
        craft(name, own, honest, rng(), 10, 2, everything)
    assert torch.allclose(craft("sign_flip", own, honest, rng(), 10, 2, everything), -2.0 * honest.mean(0))
    assert A.attack_keys("gaussian", everything) == {"sigma": 3.0}
    assert A.attack_keys("inf", everything) == {}

    seen = {}

    @dataclasses.dataclass
    class SpyKeys:
        alpha: float = 0.0

    def spy(own, honest, rng, n, f, **keys):
        seen.update(n=n, f=f, keys=keys)
        return own.clone()

    monkeypatch.setitem(ATTACKS._items, "spy", spy)
    monkeypatch.setitem(ATTACKS._keys, "spy", SpyKeys)
    craft("spy", own, honest, rng(), 12, 3, {"alpha": 0.25, "beta": 1, "f": 7})
    assert seen == {"n": 12, "f": 3, "keys": {"alpha": 0.25}}  # n, f as arguments, never from keys


def test_unknown_attack():
    own, honest = vectors(2)
    with pytest.raises(KeyError) as e:
        craft("sign_flp", own, honest, rng(), 10, 2, {})
    msg = str(e.value)
    assert "unknown attack 'sign_flp'" in msg and "did you mean 'sign_flip'" in msg
    assert "known: " + ", ".join(sorted(NAMES)) in msg


# end to end: 2 of 10 rows Byzantine, the honest ones seen by the attackers -------------
def attacked_round(n=10, f=2, d=50):
    g = torch.Generator().manual_seed(5)
    honest = 1.0 + 0.1 * torch.randn(n - f, d, generator=g, dtype=torch.float64)
    byz = [craft("sign_flip", honest[i], honest, rng(i), n, f, {}) for i in range(f)]
    x = torch.cat([honest, torch.stack(byz)])
    return honest, x, torch.full((n,), 1.0 / n, dtype=torch.float64)


def test_sign_flip_moves_the_plain_mean():
    honest, x, w = attacked_round()
    spread = (honest.max(0).values - honest.min(0).values).max().item()
    shift = (AGGREGATORS.get("mean")(x, w) - honest.mean(0)).abs()
    assert (shift > spread).all()  # every coordinate driven outside the honest spread
    assert torch.equal(aggregate_vectors("mean", x, w), AGGREGATORS.get("mean")(x, w))


def test_sign_flip_against_trimmed_mean():
    pytest.importorskip("dflsplit.sharing.robust")
    if "trimmed_mean" not in AGGREGATORS:
        pytest.skip("no trimmed_mean aggregator registered")
    honest, x, w = attacked_round()
    out = aggregate_vectors("trimmed_mean", x, w, {"f": 2})
    assert (out >= honest.min(0).values).all() and (out <= honest.max(0).values).all()
    assert math.isfinite(out.abs().max().item())
