"""Robust aggregators and pre-aggregators against plain NumPy references (float64, direct
pairwise differences, explicit d×d covariances), classic cases, errors and non-finite rows."""

import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch

from dflsplit.sharing import robust
from dflsplit.sharing.aggregators import AGGREGATORS, PRE_AGGREGATORS, aggregate_vectors

# ----------------------------------------------------------------------------- references


def ref_median(x):
    return np.median(x, axis=0)


def ref_trimmed_mean(x, f):
    n = len(x)
    return np.sort(x, axis=0)[f:n - f].mean(axis=0)


def ref_meamed(x, f):
    n = len(x)
    med = np.median(x, axis=0)
    idx = np.argsort(np.abs(x - med), axis=0, kind="stable")[:n - f]
    return np.take_along_axis(x, idx, axis=0).mean(axis=0)


def sq_dists(x):
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def ref_krum_scores(x, f):
    n = len(x)
    d = sq_dists(x)
    return np.array([np.sort(np.delete(d[i], i))[:n - f - 2].sum() for i in range(n)])


def ref_krum(x, f):
    return x[np.argmin(ref_krum_scores(x, f))]


def ref_multikrum(x, f, m=None):
    m = len(x) - f if m is None else m
    return x[np.argsort(ref_krum_scores(x, f), kind="stable")[:m]].mean(axis=0)


def ref_geometric_median(x, eps=1e-6, max_iter=100, tol=1e-6):
    z = x.mean(axis=0)
    for _ in range(max_iter):
        dist = np.linalg.norm(x - z, axis=1)
        beta = 1 / np.maximum(dist, eps)
        new = (beta[:, None] * x).sum(0) / beta.sum()
        step = np.linalg.norm(new - z)
        z = new
        if step <= tol * dist.mean():
            break
    return z


def ref_centered_clipping(x, tau=10.0, iterations=1, start="first"):
    v = {"first": x[0], "mean": x.mean(0), "median": np.median(x, 0), "zero": np.zeros(x.shape[1])}[start]
    for _ in range(iterations):
        diff = x - v
        norm = np.linalg.norm(diff, axis=1)
        c = np.minimum(1, tau / np.where(norm > 0, norm, np.inf))
        v = v + (c[:, None] * diff).mean(0)
    return v


def ref_cge(x, f):
    return x[np.argsort(np.linalg.norm(x, axis=1), kind="stable")[:len(x) - f]].mean(0)


def ref_monna(x, f):
    return x[np.argsort(np.linalg.norm(x - x[0], axis=1), kind="stable")[:len(x) - f]].mean(0)


def ref_caf(x, f):
    n = len(x)
    c = np.ones(n)
    best, best_lam = x.mean(0), np.inf
    while c.sum() > n - 2 * f:
        mu = (c[:, None] * x).sum(0) / c.sum()
        diff = x - mu
        cov = (c[:, None, None] * diff[:, :, None] * diff[:, None, :]).sum(0) / c.sum()
        lam, vec = np.linalg.eigh(cov)
        if lam[-1] < best_lam:
            best, best_lam = mu, lam[-1]
        tau = (diff @ vec[:, -1]) ** 2
        live = c > 0
        c = np.where(live, c * (1 - tau / tau[live].max()), 0)
    return best


def ref_bulyan(x, f):
    n = len(x)
    d = sq_dists(x)
    left = list(range(n))
    picked = []
    for _ in range(n - 2 * f):
        r = len(left)
        k = min(max(1, r - f - 2), r - 1)
        scores = [np.sort([d[i, j] for j in left if j != i])[:k].sum() for i in left]
        i = left[int(np.argmin(scores))]
        picked.append(i)
        left.remove(i)
    return ref_meamed_k(x[sorted(picked)], n - 4 * f)


def ref_meamed_k(x, k):
    med = np.median(x, axis=0)
    idx = np.argsort(np.abs(x - med), axis=0, kind="stable")[:k]
    return np.take_along_axis(x, idx, axis=0).mean(axis=0)


def ref_nnm(x, w, f):
    n = len(x)
    d = sq_dists(x)
    out = np.stack([x[np.argsort(d[i], kind="stable")[:n - f]].mean(0) for i in range(n)])
    return out, w


def ref_bucketing(x, w, s=2, seed=0):
    n = len(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()  # the rule's permutation
    buckets = [perm[i:i + s] for i in range(0, n, s)]
    j = next(b for b, members in enumerate(buckets) if 0 in members)
    buckets[0], buckets[j] = buckets[j], buckets[0]
    return np.stack([x[b].mean(0) for b in buckets]), np.array([w[b].sum() for b in buckets])


def ref_arc(x, w, f):
    n = len(x)
    k = int(2 * f * (n - f) / n + 1e-9)
    norms = np.linalg.norm(x, axis=1)
    order = np.argsort(-norms, kind="stable")
    out = x.copy()
    if k:
        thr = norms[order[k]]
        for i in order[:k]:
            out[i] = x[i] * min(1, thr / norms[i])
    return out, w


def ref_clipping(x, w, threshold=1.0):
    norms = np.linalg.norm(x, axis=1)
    return x * np.minimum(1, threshold / norms)[:, None], w


AGG_REFS = {
    "median": (ref_median, lambda n: [{}]),
    "trimmed_mean": (ref_trimmed_mean, lambda n: [{"f": f} for f in (0, 1, (n - 1) // 2)]),
    "meamed": (ref_meamed, lambda n: [{"f": f} for f in (0, 1, (n - 1) // 2)]),
    "krum": (ref_krum, lambda n: [{"f": f} for f in (0, 1, (n - 3) // 2)]),
    "multikrum": (ref_multikrum, lambda n: [{"f": 1}, {"f": (n - 3) // 2}, {"f": 1, "m": 2}]),
    "geometric_median": (ref_geometric_median, lambda n: [{}, {"eps": 1e-3, "max_iter": 5, "tol": 0.0}]),
    "centered_clipping": (ref_centered_clipping, lambda n: [
        {}, {"tau": 0.5, "iterations": 3, "start": "mean"}, {"tau": 2.0, "iterations": 2, "start": "median"},
        {"tau": 1.0, "iterations": 1, "start": "zero"}, {"tau": 1e9, "start": "first"}]),
    "cge": (ref_cge, lambda n: [{"f": f} for f in (0, 1, (n - 1) // 2)]),
    "monna": (ref_monna, lambda n: [{"f": f} for f in (0, 1, (n - 1) // 2)]),
    "caf": (ref_caf, lambda n: [{"f": f} for f in (0, 1, (n - 1) // 2)]),
    "bulyan": (ref_bulyan, lambda n: [{"f": f} for f in (0, 1, (n - 3) // 4)]),
}
PRE_REFS = {
    "nnm": (ref_nnm, lambda n: [{"f": f} for f in (0, 1, (n - 1) // 2)]),
    "bucketing": (ref_bucketing, lambda n: [{}, {"s": 3, "seed": 7}, {"s": 1, "seed": 1}, {"s": n}]),
    "arc": (ref_arc, lambda n: [{"f": f} for f in (0, 1, (n - 1) // 2)]),
    "clipping": (ref_clipping, lambda n: [{"threshold": 3.0}, {"threshold": 1e-3}, {"threshold": 1e9}]),
}


def inputs(n, d, seed, dtype=torch.float64, outliers=0):
    """Honest rows around a common point, the last `outliers` rows far off."""
    g = np.random.default_rng(seed)
    x = 3.0 + g.standard_normal((n, d)) * g.uniform(0.5, 2.0, size=(n, 1))
    if outliers:
        x[-outliers:] += g.standard_normal((outliers, d)) * 20 + 10
    return torch.tensor(x, dtype=dtype), torch.full((n,), 1.0 / n, dtype=dtype)


def close(a, b, dtype):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rtol = 1e-9 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, np.abs(b).max(initial=0)))


CASES = [(n, d) for n in (5, 10, 20) for d in (1, 7, 64)]


# ----------------------------------------------------------------------------- against references


@pytest.mark.parametrize("name", sorted(AGG_REFS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_aggregator_matches_numpy(name, dtype):
    ref, keyss = AGG_REFS[name]
    rule = AGGREGATORS.get(name)
    for n, d in CASES:
        for i, keys in enumerate(keyss(n)):
            if name == "bulyan" and n < 4 * keys["f"] + 3:
                continue
            x, w = inputs(n, d, seed=1000 * n + 10 * d + i, dtype=dtype, outliers=keys.get("f", 1))
            out = rule(x, w, **keys)
            assert out.shape == (d,) and out.dtype == dtype
            close(out, ref(x.double().numpy(), **keys), dtype)


@pytest.mark.parametrize("name", sorted(PRE_REFS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pre_aggregator_matches_numpy(name, dtype):
    ref, keyss = PRE_REFS[name]
    rule = PRE_AGGREGATORS.get(name)
    for n, d in CASES:
        for i, keys in enumerate(keyss(n)):
            x, w = inputs(n, d, seed=7 + 1000 * n + 10 * d + i, dtype=dtype, outliers=keys.get("f", 1))
            w = torch.rand(n, generator=torch.Generator().manual_seed(i), dtype=dtype)
            w /= w.sum()
            y, wy = rule(x, w, **keys)
            ry, rw = ref(x.double().numpy(), w.double().numpy(), **keys)
            assert y.dtype == dtype and y.shape == ry.shape and wy.shape == rw.shape
            close(y, ry, dtype)
            close(wy, rw, dtype)


@pytest.mark.parametrize("name", sorted(PRE_REFS))
@pytest.mark.parametrize("last", ["mean", "median"])
def test_pre_aggregator_composed(name, last):
    ref, keyss = PRE_REFS[name]
    ref_last = {"mean": lambda y: y.mean(0), "median": ref_median}[last]
    for n, d in CASES:
        for i, keys in enumerate(keyss(n)):
            x, w = inputs(n, d, seed=99 + 1000 * n + 10 * d + i, outliers=keys.get("f", 1))
            out = aggregate_vectors([name, last], x, w, keys)
            close(out, ref_last(ref(x.numpy(), w.numpy(), **keys)[0]), torch.float64)


def test_chain_shares_f():
    x, w = inputs(20, 9, seed=3, outliers=4)
    out = aggregate_vectors(["nnm", "trimmed_mean"], x, w, {"f": 4})
    close(out, ref_trimmed_mean(ref_nnm(x.numpy(), w.numpy(), 4)[0], 4), torch.float64)
    with pytest.raises(ValueError, match="^nnm: needs n > 2f, got n=10, f=5$"):
        aggregate_vectors(["nnm", "trimmed_mean"], *inputs(10, 3, seed=4), {"f": 5})
    with pytest.raises(ValueError, match="^trimmed_mean: needs n > 2f, got n=5, f=3$"):  # 5 buckets of 2
        aggregate_vectors(["bucketing", "trimmed_mean"], *inputs(10, 3, seed=4), {"f": 3, "s": 2})


@pytest.mark.parametrize("name, keys", [
    ("median", {}), ("trimmed_mean", {"f": 4}), ("meamed", {"f": 4}), ("bulyan", {"f": 3}), ("multikrum", {"f": 4}),
    ("geometric_median", {}), ("caf", {"f": 4}), ("centered_clipping", {"start": "median"}),
])
def test_torch_paths_match(name, keys, monkeypatch):
    """The torch paths (other devices: torch.sort, one Gram product) equal the NumPy ones."""
    x, w = inputs(20, 37, seed=5, outliers=3)
    x[3, 5], x[4, 6], x[5, 7] = math.nan, math.inf, -math.inf
    a = AGGREGATORS.get(name)(x, w, **keys)
    monkeypatch.setattr(robust, "USE_NUMPY", False)
    close(AGGREGATORS.get(name)(x, w, **keys), a, torch.float64)
    assert torch.isfinite(a).all()


def test_chunked_paths(monkeypatch):
    """Column blocks (Gram, distances, sort) with a partial last block, float32."""
    monkeypatch.setattr(robust, "_GRAM_CHUNK_BYTES", 1)
    monkeypatch.setattr(robust, "_DIST_CHUNK_BYTES", 1)
    monkeypatch.setattr(robust, "_SORT_CHUNK", 300)
    n, d = 10, 1000
    x, w = inputs(n, d, seed=11, dtype=torch.float32, outliers=2)
    xn = x.double().numpy()
    for name, keys in [("median", {}), ("meamed", {"f": 2}), ("multikrum", {"f": 2}), ("monna", {"f": 2}),
                       ("centered_clipping", {"tau": 5.0, "iterations": 2}), ("geometric_median", {}),
                       ("caf", {"f": 2})]:
        close(AGGREGATORS.get(name)(x, w, **keys), AGG_REFS[name][0](xn, **keys), torch.float32)
    close(PRE_AGGREGATORS.get("nnm")(x, w, f=2)[0], ref_nnm(xn, w.numpy(), 2)[0], torch.float32)


def test_far_from_origin_keeps_precision():
    """Nearby vectors far from the origin (as models are): float32 distances stay exact
    enough for Krum and NNM to choose as the float64 reference does."""
    g = np.random.default_rng(0)
    base = g.standard_normal(4000) * 100
    x64 = base + g.standard_normal((12, 4000)) * 1e-3 * g.uniform(1, 3, size=(12, 1))
    x = torch.tensor(x64, dtype=torch.float32)
    xr = x.double().numpy()
    w = torch.full((12,), 1 / 12)
    assert robust.krum(x, w, f=3).double().numpy().tolist() == ref_krum(xr, 3).tolist()
    np.testing.assert_allclose(robust.multikrum(x, w, f=3).numpy(), ref_multikrum(xr, 3), rtol=1e-6)
    np.testing.assert_allclose(robust.geometric_median(x, w).numpy(), ref_geometric_median(xr), rtol=1e-6)


def test_geometric_median_optimal():
    x, w = inputs(20, 5, seed=8, outliers=4)
    z = robust.geometric_median(x, w, eps=1e-12, max_iter=1000, tol=1e-12).numpy()
    xn = x.numpy()
    obj = lambda p: np.linalg.norm(xn - p, axis=1).sum()  # noqa: E731
    g = np.random.default_rng(0)
    assert all(obj(z) <= obj(z + 1e-4 * g.standard_normal(5)) for _ in range(50))
    grad = ((z - xn) / np.linalg.norm(xn - z, axis=1)[:, None]).sum(0)
    assert np.linalg.norm(grad) < 1e-6


# ----------------------------------------------------------------------------- classic cases


def test_krum_classic():
    x = torch.tensor([[0.0, 0.0]] * 4 + [[100.0, 100.0]])
    w = torch.full((5,), 0.2)
    assert robust.krum(x, w, f=1).tolist() == [0.0, 0.0]
    assert robust.multikrum(x, w, f=1).tolist() == [0.0, 0.0]


def test_trimmed_mean_f0_is_mean():
    x, w = inputs(10, 50, seed=2, dtype=torch.float32)
    torch.testing.assert_close(robust.trimmed_mean(x, w, f=0), x.mean(0))
    torch.testing.assert_close(robust.meamed(x, w, f=0), x.mean(0))


def test_median_odd_and_even():
    x = torch.tensor([[1.0, 9.0], [5.0, -2.0], [3.0, 4.0], [100.0, 0.0], [-7.0, 1.0]])
    w = torch.full((5,), 0.2)
    assert robust.median(x, w).tolist() == [3.0, 1.0]
    assert robust.median(x[:4], w[:4]).tolist() == [4.0, 2.0]
    assert robust.median(x[:1], w[:1]).tolist() == [1.0, 9.0]


def test_trimmed_mean_classic():
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [1000.0]])
    assert robust.trimmed_mean(x, torch.full((5,), 0.2), f=1).tolist() == [3.0]
    assert robust.meamed(x, torch.full((5,), 0.2), f=1).tolist() == [2.5]


def test_bulyan_and_cge_classic():
    x = torch.tensor([[1.0, 1.0]] * 6 + [[-50.0, 50.0]])
    w = torch.full((7,), 1 / 7)
    assert robust.bulyan(x, w, f=1).tolist() == [1.0, 1.0]
    assert robust.cge(x, w, f=1).tolist() == [1.0, 1.0]
    assert robust.caf(x, w, f=1).tolist() == [1.0, 1.0]


def test_monna_pivot_is_row_0():
    x = torch.tensor([[10.0], [11.0], [12.0], [0.0], [-1.0]])
    assert robust.monna(x, torch.full((5,), 0.2), f=2).tolist() == [11.0]


def test_centered_clipping_start_first_clips_around_own():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [-6.0, 8.0]])
    out = robust.centered_clipping(x, torch.full((3,), 1 / 3), tau=1.0, iterations=1)
    torch.testing.assert_close(out, torch.tensor([(0.6 - 0.6) / 3, (0.8 + 0.8) / 3]))


def test_arc_clips_largest_to_next():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -40.0], [50.0, 0.0]])
    y, _ = robust.arc(x, torch.full((5,), 0.2), f=1)  # k = floor(2 * 1/5 * 4) = 1
    torch.testing.assert_close(y, torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -40.0], [40.0, 0.0]]))
    y, _ = robust.arc(x, torch.full((5,), 0.2), f=2)  # k = floor(2 * 2/5 * 3) = 2
    torch.testing.assert_close(y[3:], torch.tensor([[0.0, -3.0], [3.0, 0.0]]))


def test_bucketing_deterministic_for_seed():
    x, w = inputs(20, 6, seed=1)
    a = robust.bucketing(x, w, s=3, seed=5)
    b = robust.bucketing(x, w, s=3, seed=5)
    c = robust.bucketing(x, w, s=3, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (7, 6) and math.isclose(float(a[1].sum()), 1.0)


def test_bucketing_keeps_own_vector_first():
    x = torch.arange(10.0)[:, None]
    for seed in range(10):
        y, _ = robust.bucketing(x, torch.full((10,), 0.1), s=1, seed=seed)
        assert y[0, 0] == 0 and sorted(y[:, 0].tolist()) == list(range(10))


# ----------------------------------------------------------------------------- errors and keys


@pytest.mark.parametrize("name, n, f, cond", [
    ("trimmed_mean", 4, 2, "n > 2f"), ("meamed", 6, 3, "n > 2f"), ("krum", 6, 2, r"n > 2f \+ 2"),
    ("multikrum", 4, 1, r"n > 2f \+ 2"), ("cge", 2, 1, "n > 2f"), ("monna", 8, 4, "n > 2f"),
    ("caf", 3, 2, "n > 2f"), ("bulyan", 10, 2, r"n >= 4f \+ 3"),
])
def test_aggregator_errors_name_n_and_f(name, n, f, cond):
    x, w = inputs(n, 3, seed=0)
    with pytest.raises(ValueError, match=rf"^{name}: needs {cond}, got n={n}, f={f}$"):
        AGGREGATORS.get(name)(x, w, f=f)


@pytest.mark.parametrize("name, n, f", [("nnm", 4, 2), ("arc", 5, 3)])
def test_pre_aggregator_errors_name_n_and_f(name, n, f):
    x, w = inputs(n, 3, seed=0)
    with pytest.raises(ValueError, match=rf"^{name}: needs n > 2f, got n={n}, f={f}$"):
        PRE_AGGREGATORS.get(name)(x, w, f=f)


def test_other_errors():
    x, w = inputs(10, 3, seed=0)
    with pytest.raises(ValueError, match=r"multikrum: needs 1 <= m <= n - f, got n=10, f=2, m=9"):
        robust.multikrum(x, w, f=2, m=9)
    with pytest.raises(ValueError, match="f must be an integer >= 0"):
        robust.trimmed_mean(x, w, f=-1)
    with pytest.raises(ValueError, match="start must be"):
        robust.centered_clipping(x, w, start="last")
    with pytest.raises(ValueError, match="threshold > 0"):
        robust.clipping(x, w, threshold=0.0)
    with pytest.raises(ValueError, match="s must be an integer >= 1"):
        robust.bucketing(x, w, s=0)


def test_keys_dataclasses_match_signatures():
    for registry in (AGGREGATORS, PRE_AGGREGATORS):
        for name in registry.names():
            cls = registry.keys_of(name)
            params = inspect.signature(inspect.unwrap(registry.get(name))).parameters
            declared = {f.name: f.default for f in dataclasses.fields(cls)} if cls else {}
            assert {k: p.default for k, p in params.items() if k not in ("x", "w")} == declared, name
            assert all(f.metadata.get("doc") for f in (dataclasses.fields(cls) if cls else ())), name


# ----------------------------------------------------------------------------- non-finite rows


ROBUST = {
    "median": {}, "trimmed_mean": {"f": 3}, "meamed": {"f": 3}, "krum": {"f": 3}, "multikrum": {"f": 3},
    "geometric_median": {}, "centered_clipping": {}, "cge": {"f": 3}, "monna": {"f": 3}, "caf": {"f": 3},
    "bulyan": {"f": 3},
}
CC_STARTS = [{"start": s, "tau": 1.0, "iterations": 3} for s in ("first", "mean", "median", "zero")]


def poisoned(rows, n=16, d=40, dtype=torch.float32, seed=0):
    x, w = inputs(n, d, seed=seed, dtype=dtype)
    kinds = [math.nan, math.inf, -math.inf, 1e30]
    for j, r in enumerate(rows):
        x[r, j % d] = kinds[j % 4]
        if j % 2:  # a whole row of one kind, and a single entry
            x[r] = kinds[(j + 1) % 4]
    return x, w


@pytest.mark.parametrize("rows", [[5, 9, 15], [0, 7, 8], [0], [2, 3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_rows_give_finite_outputs(rows, dtype):
    x, w = poisoned(rows, dtype=dtype)
    for name, keys in [*ROBUST.items(), *(("centered_clipping", k) for k in CC_STARTS)]:
        out = AGGREGATORS.get(name)(x, w, **keys)
        assert torch.isfinite(out).all(), (name, keys, rows)
    for pre, keys in [("nnm", {"f": 3}), ("arc", {"f": 3}), ("clipping", {"threshold": 2.0})]:
        y, _ = PRE_AGGREGATORS.get(pre)(x, w, **keys)
        assert torch.isfinite(y).all(), (pre, rows)
        for last in ("mean", "trimmed_mean", "multikrum", "geometric_median"):
            assert torch.isfinite(aggregate_vectors([pre, last], x, w, keys)).all(), (pre, last, rows)
    assert torch.isfinite(aggregate_vectors(["bucketing", "trimmed_mean"], x, w, {"s": 2, "f": 3})).all()


def test_non_finite_rows_are_dropped_not_averaged():
    """With the bad rows left out the result is the rule on the finite rows alone (for the
    selection rules whose choice the bad rows cannot change)."""
    x, w = inputs(12, 10, seed=4, outliers=0)
    bad = x.clone()
    bad[[3, 7]] = math.nan
    keep = torch.tensor([i for i in range(12) if i not in (3, 7)])
    torch.testing.assert_close(robust.cge(bad, w, f=2), ref_t(ref_cge(x[keep].numpy(), 0)))
    torch.testing.assert_close(robust.monna(bad, w, f=2), ref_t(ref_monna(x[keep].numpy(), 0)))
    torch.testing.assert_close(robust.geometric_median(bad, w), ref_t(ref_geometric_median(x[keep].numpy())))


def ref_t(a):
    return torch.tensor(a, dtype=torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x, w = poisoned([4, 11], n=16, d=300, dtype=torch.float32)
    xc, wc = x.cuda(), w.cuda()
    for name, keys in [*ROBUST.items(), *(("centered_clipping", k) for k in CC_STARTS)]:
        out = AGGREGATORS.get(name)(xc, wc, **keys)
        assert out.device.type == "cuda"
        close(out.cpu(), AGGREGATORS.get(name)(x, w, **keys), torch.float32)
    for pre, keys in [("nnm", {"f": 3}), ("arc", {"f": 3}), ("clipping", {"threshold": 2.0}), ("bucketing", {"s": 3})]:
        y, wy = PRE_AGGREGATORS.get(pre)(xc, wc, **keys)
        ry, rw = PRE_AGGREGATORS.get(pre)(x, w, **keys)
        assert y.device.type == "cuda" and wy.device.type == "cuda"
        assert torch.equal(torch.isfinite(y.cpu()), torch.isfinite(ry))
        close(torch.nan_to_num(y.cpu()), torch.nan_to_num(ry), torch.float32)
        close(wy.cpu(), rw, torch.float32)
