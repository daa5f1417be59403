"""Byzantine-robust aggregators and pre-aggregators (registered in `AGGREGATORS` and
`PRE_AGGREGATORS`, the interface of :mod:`dflsplit.sharing.aggregators`).

Every rule takes the n input vectors as the rows of ``x`` (Tensor[n, d]) and their weights
``w`` (ignored by the robust rules); row 0 is the aggregating node's own vector. ``f`` is
the number of Byzantine inputs a rule tolerates; the rules of one chain share it.

Aggregators (→ Tensor[d]):

* ``median``: coordinate-wise median (the mean of the two middle values when n is even).
* ``trimmed_mean`` (f; n > 2f): per coordinate, the mean after dropping the f largest and
  the f smallest values.
* ``meamed`` (f; n > 2f): per coordinate, the mean of the n − f values closest to the
  median (Xie et al. 2018).
* ``krum`` (f; n > 2f + 2): the input whose n − f − 2 nearest neighbours are closest in
  summed squared distance (Blanchard et al. 2017). ``multikrum`` (f, m; n > 2f + 2,
  1 ≤ m ≤ n − f, default m = n − f): the average of the m inputs with the best scores.
* ``geometric_median`` (eps, max_iter, tol): smoothed Weiszfeld (Pillutla et al. RFA):
  from the mean, z ← Σ β_i x_i / Σ β_i with β_i = 1 / max(eps, ‖x_i − z‖), until a step
  is at most tol × the mean distance of the inputs to z, or max_iter steps.
* ``centered_clipping`` (tau, iterations, start; Karimireddy et al. 2021): from v = the own
  vector (``first``), the ``mean``, the coordinate-wise ``median`` or ``zero``, repeat
  v ← v + (1/n) Σ_i min(1, tau / ‖x_i − v‖) (x_i − v).
* ``cge`` (f; n > 2f): comparative gradient elimination (Gupta et al. 2021): the average of
  the n − f inputs of smallest norm.
* ``monna`` (f; n > 2f): the average of the n − f inputs nearest to row 0, the own vector
  (Allouah et al. 2023; ByzFL's MoNNA with idx = 0).
* ``caf`` (f; n > 2f): covariance-bound agnostic filter (Allouah, Guerraoui & Stephan,
  ICML 2025; ByzFL's CAF): weights c = 1; while Σc > n − 2f: μ_c = the c-weighted mean,
  (λ, v) = the top eigenpair of the c-weighted covariance, τ_i = ((x_i − μ_c)·v)²,
  c_i ← c_i (1 − τ_i / max τ); returns the μ_c of the smallest λ. The eigenpair is exact
  (ByzFL does one power iteration from a random vector) and max τ is taken over the
  inputs still weighted (c_i > 0), so that every round drops one input and the loop ends
  within 2f rounds (ByzFL takes it over all inputs).
* ``bulyan`` (f; n ≥ 4f + 3; El Mhamdi et al. 2018): θ = n − 2f inputs chosen one by one
  by Krum among those left (each time with max(1, r − f − 2) neighbours, r inputs left),
  then per coordinate the mean of the β = θ − 2f selected values closest to their median.

Pre-aggregators (→ (Tensor[m, d], Tensor[m])):

* ``nnm`` (f; n > 2f): nearest neighbour mixing (Allouah et al. 2023): every input replaced
  by the mean of its n − f nearest inputs, itself included.
* ``bucketing`` (s, seed; Karimireddy et al. 2022): a random permutation from a generator
  seeded with ``seed`` (the same permutation at every call), the inputs averaged in
  buckets of s (the last may be smaller); a bucket's weight is the sum of its members'
  weights, and the bucket holding row 0 comes first (so row 0 still holds the own vector).
* ``arc`` (f; n > 2f): adaptive robust clipping (Allouah et al. 2025): the
  k = ⌊2 (f/n) (n − f)⌋ inputs of largest norm are scaled down to the norm of the
  (k+1)-th largest.
* ``clipping`` (threshold): every input scaled to norm ≤ threshold.

Non-finite inputs. A robust rule returns a finite vector whenever at most f rows hold NaN
or ±inf (for the rules without f: fewer than half of the rows for ``median``, fewer than
all for ``geometric_median`` and ``centered_clipping``), and the other rows are finite:

* coordinate-wise rules sort NaN after +inf, so that at most f non-finite values of a
  coordinate are all among the f largest or f smallest ones that the rule drops;
* distance-based rules treat a row whose squared norm (relative to a finite reference row)
  is not finite — NaN, ±inf, or values so large that their squares overflow — as
  infinitely far from every row, and never give it a weight (it is left out of sums, never
  multiplied by 0); a pivot (row 0 for ``monna``, the start ``first`` of
  ``centered_clipping``) that is not finite is replaced by the first finite row;
* ``nnm`` mixes such a row from the n − f finite rows nearest to the reference row, and
  ``arc`` and ``clipping`` turn it into the zero vector (its direction is unknown);
  ``bucketing`` passes it on to its bucket, for the aggregator after it to drop.

Precision and speed. Pairwise distances come from one Gram matrix of the rows minus a
reference row (row 0, or the first finite row), made exactly symmetric and used in float64:
distances between nearby vectors far from the origin (models) keep the precision of their
difference rather than of their norms. Only ``monna`` and ``centered_clipping`` need
distances to one vector, which they compute from the exact differences. The small n×n work
(Krum scores, the Weiszfeld and CAF iterations, which run on the Gram matrix: a vector
z = Σ a_i x_i is carried as its coefficients a) is float64; the result is one product of
coefficients and rows. On the CPU (float32/float64) the heavy steps run in NumPy on
``torch.get_num_threads()`` threads over blocks of columns, with NumPy's BLAS held to one
thread meanwhile: the Gram matrix as BLAS syrk (half the work of a matrix product), the
coordinate-wise rules as NumPy's vectorised sort of transposed blocks (several times faster
than ``torch.sort`` along dim 0); the rules that mix NumPy threads with torch keep their
large steps on one side, since torch's OpenMP threads spin on the cores for a while after a
parallel region. On other devices all of it runs in torch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch

from ..registry import key
from .aggregators import AGGREGATORS, PRE_AGGREGATORS

Tensor = torch.Tensor
INF = math.inf

_GRAM_CHUNK_BYTES = 1 << 21   # columns per chunk of the shifted Gram matrix: n × C × itemsize ≈ 2 MB
_DIST_CHUNK_BYTES = 1 << 20   # same, for distances to one vector
_SORT_CHUNK = 2048            # columns per block of the CPU coordinate-wise sort
_SORT_ROWS = 8                # rows per transposing copy (NumPy copies 8-row strips fastest)
USE_NUMPY = True              # CPU work in NumPy threads; tests switch it off to check the torch paths


# --------------------------------------------------------------------------- keys


def _f_key():
    return key(0, "number of Byzantine inputs tolerated (f)", ge=0)


@dataclass
class ByzantineKeys:
    f: int = _f_key()


@dataclass
class MultiKrumKeys:
    f: int = _f_key()
    m: Optional[int] = key(None, "multikrum: inputs averaged, those of best Krum score (default n − f)", ge=1)


@dataclass
class GeometricMedianKeys:
    eps: float = key(1e-6, "geometric_median: smallest distance used in a Weiszfeld weight 1/‖x_i − z‖", gt=0)
    max_iter: int = key(100, "geometric_median: most Weiszfeld steps", ge=1)
    tol: float = key(1e-6, "geometric_median: stop once a step is at most tol × the mean distance to z", ge=0)


@dataclass
class CenteredClippingKeys:
    tau: float = key(10.0, "centered_clipping: clipping radius τ of x_i − v", gt=0)
    iterations: int = key(1, "centered_clipping: clipping rounds L", ge=1)
    start: Literal["first", "mean", "median", "zero"] = key(
        "first", "centered_clipping: initial v: first (row 0, the own vector), mean, median or zero")


@dataclass
class BucketingKeys:
    s: int = key(2, "bucketing: inputs per bucket", ge=1)
    seed: int = key(0, "bucketing: seed of the permutation (the same at every call)")


@dataclass
class ClippingKeys:
    threshold: float = key(1.0, "clipping: largest norm of an input", gt=0)


# --------------------------------------------------------------------------- checks


def _check_f(rule: str, f: int) -> int:
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
        raise ValueError(f"{rule}: f must be an integer >= 0, got f={f!r}")
    return int(f)


def _need(rule: str, ok: bool, cond: str, n: int, f: int, extra: str = "") -> None:
    if not ok:
        raise ValueError(f"{rule}: needs {cond}, got n={n}, f={f}{extra}")


def _float_io(fn: Callable) -> Callable:
    """Run `fn` on detached inputs, in float32 for inputs neither float32 nor float64 (cast back)."""
    @functools.wraps(fn)
    def wrapper(x: Tensor, w: Tensor, **keys):
        if x.dtype in (torch.float32, torch.float64):
            return fn(x.detach(), w, **keys)
        out = fn(x.detach().float(), w.float(), **keys)
        if isinstance(out, tuple):
            return out[0].to(x.dtype), out[1].to(w.dtype)
        return out.to(x.dtype)
    return wrapper


# --------------------------------------------------------------------------- distances


def _finite_row(x: Tensor, i: int) -> bool:
    if x.device.type == "cpu":  # one thread: no torch parallel region before NumPy threads start
        with np.errstate(all="ignore"):
            return bool(np.isfinite(x[i].numpy().sum()))
    return bool(torch.isfinite(x[i].sum()))


def _reference_row(x: Tensor) -> int:
    """Row 0 if it is finite, else the first finite row (0 if none is)."""
    if _finite_row(x, 0):
        return 0
    ok = torch.isfinite(x.sum(1)).nonzero()
    return int(ok[0, 0]) if len(ok) else 0


def _chunk(n: int, d: int, itemsize: int, budget: int) -> int:
    return max(256, min(d, budget // max(1, n * itemsize)))


# ----- CPU threads: NumPy releases the GIL, so column blocks go to torch.get_num_threads()
# Python threads, with OpenBLAS held to one thread meanwhile (else its own pool serialises them)

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_blas = None  # threadpoolctl's controller of the loaded BLAS libraries (False: unavailable)


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of `workers` threads of this process (a forked child makes its own: the
    parent's threads do not survive the fork)."""
    k = (os.getpid(), workers)
    if k not in _pools:
        _pools[k] = ThreadPoolExecutor(workers, thread_name_prefix="dflsplit-robust")
    return _pools[k]


def _one_blas_thread():
    """A context in which NumPy's BLAS runs on the calling thread only (a no-op without
    threadpoolctl, which comes with scikit-learn)."""
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
            _blas = ThreadpoolController().select(user_api="blas")
        except Exception:  # pragma: no cover - threadpoolctl missing or failing
            _blas = False
    return _blas.limit(limits=1) if _blas else contextlib.nullcontext()


def _in_threads(work: Callable, spans: list, workers: Optional[int] = None) -> list:
    """work(part) for `workers` (default torch.get_num_threads()) contiguous parts of `spans`."""
    workers = max(1, min(workers or torch.get_num_threads(), len(spans)))

    def quiet(part):  # NaN and inf inputs are expected: no RuntimeWarnings
        with np.errstate(all="ignore"):
            return work(part)

    with _one_blas_thread():
        if workers == 1:
            return [quiet(spans)]
        per = -(-len(spans) // workers)
        futures = [_pool(workers).submit(quiet, spans[i:i + per]) for i in range(0, len(spans), per)]
        return [fut.result() for fut in futures]


def _gram(x: Tensor, r: int) -> Tensor:
    """float64 G_ij = (x_i − x_r)·(x_j − x_r), computed in x's dtype column block by block
    (on the CPU: BLAS syrk, b @ b.T, on every torch thread)."""
    n, d = x.shape
    if x.device.type != "cpu" or d == 0:
        y = x - x[r]
        return (y @ y.T).double()
    c = _chunk(n, d, x.element_size(), _GRAM_CHUNK_BYTES)
    if USE_NUMPY and x.dtype in (torch.float32, torch.float64):
        xn = x.numpy()

        def work(part):
            g = np.zeros((n, n))
            buf = np.empty((n, c), dtype=xn.dtype)
            for s, e in part:
                b = buf[:, :e - s]
                np.subtract(xn[:, s:e], xn[r, s:e], out=b)
                g += b @ b.T  # NumPy calls syrk for a product with its own transpose
            return g

        return torch.from_numpy(sum(_in_threads(work, [(s, min(d, s + c)) for s in range(0, d, c)])))
    g = torch.zeros(n, n, dtype=x.dtype)
    buf = torch.empty(n, c, dtype=x.dtype)
    for s in range(0, d, c):
        e = min(d, s + c)
        b = buf if e - s == c else torch.empty(n, e - s, dtype=x.dtype)
        torch.sub(x[:, s:e], x[r, s:e], out=b)
        g.addmm_(b, b.T)
    return g.double()


def _sq_dists_to(x: Tensor, v: Tensor) -> Tensor:
    """float64 ‖x_i − v‖² for every row, from the exact differences (block by block)."""
    n, d = x.shape
    if x.device.type != "cpu" or d == 0:
        return (x - v).square().sum(1).double()
    c = _chunk(n, d, x.element_size(), _DIST_CHUNK_BYTES)
    acc = torch.zeros(n, dtype=torch.float64)
    buf = torch.empty(n, c, dtype=x.dtype)
    for s in range(0, d, c):
        e = min(d, s + c)
        b = buf if e - s == c else torch.empty(n, e - s, dtype=x.dtype)
        torch.sub(x[:, s:e], v[s:e], out=b)
        acc += b.square_().sum(1)
    return acc


def _shifted_gram(x: Tensor) -> tuple[Tensor, Tensor]:
    """(G of the rows minus a finite reference row, bad rows), on the CPU (the n×n work is
    small), with the bad rows' entries 0."""
    g = _gram(x, _reference_row(x)).cpu()
    bad = ~torch.isfinite(g.diagonal())
    if bad.any():
        g[bad] = 0
        g[:, bad] = 0
    return g, bad


def _pairwise(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(squared distances D (n×n float64, inf to and from bad rows, 0 on the good diagonal),
    bad rows, the reference row's squared distances to every row)."""
    g, bad = _shifted_gram(x)
    g = (g + g.T) * 0.5  # exactly symmetric, so that D_ij = D_ji and tied scores tie
    diag = g.diagonal()
    dist = (diag[:, None] + diag[None, :] - 2 * g).clamp_(min=0)
    dist.fill_diagonal_(0)
    dist[bad] = INF
    dist[:, bad] = INF
    to_ref = diag.clone()
    to_ref[bad] = INF
    return dist, bad, to_ref


def _combine(x: Tensor, coef: Tensor, bad: Optional[Tensor] = None, threads: bool = False) -> Tensor:
    """coef @ x for float64 coefficients coef (n,) or (m, n), leaving out the rows whose
    coefficients are all 0 when some rows are not finite (0 · NaN would be NaN). With
    `threads` (the rules whose other CPU work runs in NumPy threads) the product runs there
    too: a torch parallel region just before NumPy threads slows them down (its OpenMP
    threads spin on the cores for a while)."""
    coef = coef.cpu()
    rows = None
    if bad is not None and bool(bad.any()):
        rows = (coef.reshape(-1, coef.shape[-1]) != 0).any(0).nonzero().flatten()
        coef = coef[..., rows]
    if threads and USE_NUMPY and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        xn = x.numpy()
        if rows is not None:
            xn = xn[rows.numpy()]
        cm = coef.numpy().astype(xn.dtype)
        n, d = xn.shape
        out = np.empty(cm.shape[:-1] + (d,), dtype=xn.dtype)
        c = _chunk(n, d, xn.itemsize, _GRAM_CHUNK_BYTES)

        def work(part):
            for s, e in part:
                out[..., s:e] = cm @ xn[:, s:e]

        _in_threads(work, [(s, min(d, s + c)) for s in range(0, d, c)])
        return torch.from_numpy(out)
    if rows is not None:
        x = x.index_select(0, rows.to(x.device))
    return coef.to(dtype=x.dtype, device=x.device) @ x


def _select_mean(x: Tensor, idx: Tensor, bad: Optional[Tensor], threads: bool = False) -> Tensor:
    coef = torch.zeros(x.shape[0], dtype=torch.float64)
    coef[idx.cpu()] = 1.0 / len(idx)
    return _combine(x, coef, bad, threads)


def _smallest(values: Tensor, k: int) -> Tensor:
    """Indices of the k smallest values, ties to the lower index."""
    return torch.sort(values, stable=True).indices[:k]


def _row_norms(x: Tensor) -> tuple[Tensor, Tensor]:
    """(float64 row norms with inf for rows that are not finite, bad rows)."""
    norms = torch.linalg.vector_norm(x, dim=1).double().cpu()
    bad = ~torch.isfinite(norms)
    return norms.masked_fill(bad, INF), bad


# --------------------------------------------------------------------------- coordinate-wise


def _median_np(s: np.ndarray) -> np.ndarray:
    n = s.shape[1]
    if n % 2:
        return s[:, n // 2].copy()
    return 0.5 * s[:, n // 2 - 1] + 0.5 * s[:, n // 2]


def _median_torch(s: Tensor) -> Tensor:
    n = s.shape[1]
    if n % 2:
        return s[:, n // 2].clone()
    return 0.5 * s[:, n // 2 - 1] + 0.5 * s[:, n // 2]


def _row_sums(s: np.ndarray) -> np.ndarray:
    """Row sums of a 2-D block as a BLAS matrix-vector product (NumPy's sum along short rows
    is several times slower)."""
    return s @ np.ones(s.shape[1], dtype=s.dtype)


def _trimmed_np(s: np.ndarray, f: int) -> np.ndarray:
    n = s.shape[1]
    return _row_sums(s[:, f:n - f]) / (n - 2 * f)


def _trimmed_torch(s: Tensor, f: int) -> Tensor:
    return s[:, f:s.shape[1] - f].mean(1)


def _closest_np(s: np.ndarray, k: int) -> np.ndarray:
    """Per row of the sorted `s`, the mean of the k values closest to the median: the window
    s[j : j + k] (j = 0..n−k) whose farthest value is nearest to the median (the lowest j
    on ties). Its sum only adds values of the window (no prefix-sum differences, which
    outliers would cancel)."""
    n = s.shape[1]
    h = n - k  # windows start at 0..h
    if h == 0:
        return _row_sums(s) / n
    med = _median_np(s)[:, None]
    far = np.maximum(med - s[:, :h + 1], s[:, k - 1:] - med)
    far[np.isnan(far)] = INF
    start = far.argmin(axis=1)[:, None]
    if k > h:  # all windows share s[:, h:k]; window j adds s[:, j:h] and s[:, k:k + j]
        j = np.arange(h)
        total = _row_sums(s[:, h:k]) + _row_sums(np.where(j >= start, s[:, :h], 0)) \
            + _row_sums(np.where(j < start, s[:, k:], 0))
        return total / k
    return _row_sums(np.take_along_axis(s, start + np.arange(k), axis=1)) / k


def _closest_torch(s: Tensor, k: int) -> Tensor:
    n = s.shape[1]
    if k == n:
        return s.mean(1)
    med = _median_torch(s)[:, None]
    far = torch.maximum(med - s[:, :n - k + 1], s[:, k - 1:] - med)
    far = torch.nan_to_num(far, nan=INF, posinf=INF, neginf=INF)
    start = far.argmin(1)[:, None]
    j = torch.arange(n, device=s.device)
    inside = (j >= start) & (j < start + k)
    return torch.where(inside, s, torch.zeros((), dtype=s.dtype, device=s.device)).sum(1) / k


_KERNELS = {"median": (_median_np, _median_torch), "trimmed": (_trimmed_np, _trimmed_torch),
            "closest": (_closest_np, _closest_torch)}


def _coordinatewise(x: Tensor, kernel: str, *args) -> Tensor:
    """kernel(values of each coordinate sorted ascending, NaN last) for every coordinate."""
    n, d = x.shape
    k_np, k_torch = _KERNELS[kernel]
    if not (USE_NUMPY and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)):
        return k_torch(torch.sort(x, dim=0).values.T, *args).to(x.dtype)
    xn = x.numpy()
    out = np.empty(d, dtype=xn.dtype)
    spans = [(s, min(d, s + _SORT_CHUNK)) for s in range(0, d, _SORT_CHUNK)]

    def work(part):
        buf = np.empty((_SORT_CHUNK, n), dtype=xn.dtype)
        for s, e in part:
            b = buf[:e - s]
            for r in range(0, n, _SORT_ROWS):
                np.copyto(b[:, r:r + _SORT_ROWS], xn[r:r + _SORT_ROWS, s:e].T)
            b.sort(axis=1)
            out[s:e] = k_np(b, *args)

    _in_threads(work, spans)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- aggregators


@AGGREGATORS.register("median")
@_float_io
def median(x: Tensor, w: Tensor) -> Tensor:
    """Coordinate-wise median (the mean of the two middle values when n is even)."""
    return _coordinatewise(x, "median")


@AGGREGATORS.register("trimmed_mean", keys=ByzantineKeys)
@_float_io
def trimmed_mean(x: Tensor, w: Tensor, f: int = 0) -> Tensor:
    """Per coordinate, the mean of the values left after dropping the f largest and f smallest."""
    n, f = x.shape[0], _check_f("trimmed_mean", f)
    _need("trimmed_mean", n > 2 * f, "n > 2f", n, f)
    return _coordinatewise(x, "trimmed", f)


@AGGREGATORS.register("meamed", keys=ByzantineKeys)
@_float_io
def meamed(x: Tensor, w: Tensor, f: int = 0) -> Tensor:
    """Per coordinate, the mean of the n − f values closest to the median."""
    n, f = x.shape[0], _check_f("meamed", f)
    _need("meamed", n > 2 * f, "n > 2f", n, f)
    return _coordinatewise(x, "closest", n - f)


def _krum_scores(dist: Tensor, f: int, left: Optional[Tensor] = None) -> Tensor:
    """Krum score of every row among the rows `left` (all by default): the sum of its
    max(1, r − f − 2) smallest squared distances to the other rows left (r rows); inf for
    rows not left."""
    n = dist.shape[0]
    left = torch.ones(n, dtype=torch.bool) if left is None else left
    r = int(left.sum())
    k = min(max(1, r - f - 2), r - 1)
    if k <= 0:
        return torch.where(left, 0.0, INF).double()
    dm = dist.clone()
    dm.fill_diagonal_(INF)
    dm[:, ~left] = INF
    scores = dm.topk(k, dim=1, largest=False).values.sum(1)
    return scores.masked_fill(~left, INF)


@AGGREGATORS.register("krum", keys=ByzantineKeys)
@_float_io
def krum(x: Tensor, w: Tensor, f: int = 0) -> Tensor:
    """The input of smallest Krum score (summed squared distance to its n − f − 2 nearest)."""
    n, f = x.shape[0], _check_f("krum", f)
    _need("krum", n > 2 * f + 2, "n > 2f + 2", n, f)
    dist, _, _ = _pairwise(x)
    i = int(_smallest(_krum_scores(dist, f), 1)[0])
    return torch.from_numpy(x[i].numpy().copy()) if x.device.type == "cpu" else x[i].clone()


@AGGREGATORS.register("multikrum", keys=MultiKrumKeys)
@_float_io
def multikrum(x: Tensor, w: Tensor, f: int = 0, m: Optional[int] = None) -> Tensor:
    """The average of the m inputs of smallest Krum score (default m = n − f)."""
    n, f = x.shape[0], _check_f("multikrum", f)
    _need("multikrum", n > 2 * f + 2, "n > 2f + 2", n, f)
    m = n - f if m is None else m
    _need("multikrum", isinstance(m, (int, np.integer)) and 1 <= m <= n - f, "1 <= m <= n - f", n, f, f", m={m}")
    dist, bad, _ = _pairwise(x)
    return _select_mean(x, _smallest(_krum_scores(dist, f), int(m)), bad, threads=True)


@AGGREGATORS.register("geometric_median", keys=GeometricMedianKeys)
@_float_io
def geometric_median(x: Tensor, w: Tensor, eps: float = 1e-6, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Smoothed Weiszfeld from the mean: z ← Σ β_i x_i / Σ β_i, β_i = 1 / max(eps, ‖x_i − z‖)."""
    if not eps > 0 or max_iter < 1 or tol < 0:
        raise ValueError(f"geometric_median: needs eps > 0, max_iter >= 1, tol >= 0, got eps={eps}, "
                         f"max_iter={max_iter}, tol={tol}")
    g_t, bad_t = _shifted_gram(x)
    g, good = g_t.cpu().numpy(), ~bad_t.cpu().numpy()
    if not good.any():
        return x.mean(0)
    diag = np.diagonal(g)
    a = good / good.sum()
    for _ in range(int(max_iter)):
        ga = g @ a
        dist = np.sqrt(np.maximum(diag - 2 * ga + a @ ga, 0))
        beta = np.where(good, 1 / np.maximum(dist, eps), 0)
        new = beta / beta.sum()
        step = new - a
        a = new
        if math.sqrt(max(step @ g @ step, 0)) <= tol * dist[good].mean():
            break
    return _combine(x, torch.from_numpy(a), bad_t, threads=True)


@AGGREGATORS.register("centered_clipping", keys=CenteredClippingKeys)
@_float_io
def centered_clipping(x: Tensor, w: Tensor, tau: float = 10.0, iterations: int = 1, start: str = "first") -> Tensor:
    """L rounds of v ← v + (1/n) Σ min(1, τ / ‖x_i − v‖)(x_i − v) from v = row 0, the mean,
    the median or zero."""
    n = x.shape[0]
    if not tau > 0 or iterations < 1:
        raise ValueError(f"centered_clipping: needs tau > 0 and iterations >= 1, got tau={tau}, iterations={iterations}")
    if start == "first":
        v = x[_reference_row(x)].clone()
    elif start == "mean":
        v = x.mean(0)
        if not bool(torch.isfinite(v).all()):
            ok = torch.isfinite(x.sum(1))
            v = x[ok].mean(0) if ok.any() else v
    elif start == "median":
        v = _coordinatewise(x, "median").to(x.device)
    elif start == "zero":
        v = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    else:
        raise ValueError(f"centered_clipping: start must be first, mean, median or zero, got {start!r}")
    for _ in range(int(iterations)):
        dist = _sq_dists_to(x, v).sqrt().cpu()
        bad = ~torch.isfinite(dist)
        c = torch.where(dist > tau, tau / dist, torch.ones((), dtype=torch.float64)).masked_fill(bad, 0)
        v = v * (1 - float(c.sum()) / n) + _combine(x, c / n, bad)
    return v


@AGGREGATORS.register("cge", keys=ByzantineKeys)
@_float_io
def cge(x: Tensor, w: Tensor, f: int = 0) -> Tensor:
    """Comparative gradient elimination: the average of the n − f inputs of smallest norm."""
    n, f = x.shape[0], _check_f("cge", f)
    _need("cge", n > 2 * f, "n > 2f", n, f)
    norms, bad = _row_norms(x)
    return _select_mean(x, _smallest(norms, n - f), bad)


@AGGREGATORS.register("monna", keys=ByzantineKeys)
@_float_io
def monna(x: Tensor, w: Tensor, f: int = 0) -> Tensor:
    """The average of the n − f inputs nearest to row 0 (the own vector; itself included)."""
    n, f = x.shape[0], _check_f("monna", f)
    _need("monna", n > 2 * f, "n > 2f", n, f)
    dist = _sq_dists_to(x, x[_reference_row(x)]).cpu()
    bad = ~torch.isfinite(dist)
    return _select_mean(x, _smallest(dist.masked_fill(bad, INF), n - f), bad)


@AGGREGATORS.register("caf", keys=ByzantineKeys)
@_float_io
def caf(x: Tensor, w: Tensor, f: int = 0) -> Tensor:
    """Covariance-bound agnostic filter: down-weights inputs along the top eigenvector of the
    weighted covariance; returns the weighted mean of smallest top eigenvalue."""
    n, f = x.shape[0], _check_f("caf", f)
    _need("caf", n > 2 * f, "n > 2f", n, f)
    g_t, bad_t = _shifted_gram(x)
    g, bad = g_t.cpu().numpy(), bad_t.cpu().numpy()
    if bad.all():
        return x.mean(0)
    c = np.where(bad, 0.0, 1.0)
    best, best_lam = c / c.sum(), INF
    while c.sum() > n - 2 * f:
        live = np.flatnonzero(c > 0)  # the rows of c = 0 take no part (their weight stays 0)
        cl, gl = c[live], g[np.ix_(live, live)]
        s = cl.sum()
        a = cl / s
        # K = (Y − 1μᵀ)(Y − 1μᵀ)ᵀ with μ = aᵀY, from the Gram matrix of the rows Y; the
        # covariance Σ = Yᵀ diag(c) Y / s shares its top eigenpair with √c K √c / s (n×n)
        ga = gl @ a
        k = gl - ga[:, None] - ga[None, :] + a @ ga
        root = np.sqrt(cl)
        lam, u = _top_eigenpair(root[:, None] * k * root[None, :] / s)
        if lam < best_lam:
            best_lam = lam
            best = np.zeros(n)
            best[live] = a
        if not lam > 0:
            break
        tau = np.square(k @ (root * u)) / (s * lam)  # ((y_i − μ)·v)², v the top eigenvector of Σ
        tau_max = tau.max()
        if not tau_max > 0:
            break
        c = np.zeros(n)
        c[live] = cl * np.clip(1 - tau / tau_max, 0, 1)
    return _combine(x, torch.from_numpy(best), bad_t, threads=True)


def _top_eigenpair(m: np.ndarray) -> tuple[float, np.ndarray]:
    """The largest eigenvalue of the symmetric `m` and a unit eigenvector."""
    if _dsyevr is not None:
        w, z, _, _, info = _dsyevr(m, compute_v=1, range="I", il=len(m), iu=len(m))
        if info == 0:
            return float(w[0]), z[:, 0]
    lam, vec = np.linalg.eigh(m)
    return float(lam[-1]), vec[:, -1]


try:  # LAPACK's dsyevr for one eigenpair (scipy comes with scikit-learn); else numpy's eigh
    from scipy.linalg.lapack import dsyevr as _dsyevr
except ImportError:  # pragma: no cover
    _dsyevr = None


@AGGREGATORS.register("bulyan", keys=ByzantineKeys)
@_float_io
def bulyan(x: Tensor, w: Tensor, f: int = 0) -> Tensor:
    """θ = n − 2f inputs picked one by one by Krum, then per coordinate the mean of the
    β = θ − 2f picked values closest to their median."""
    n, f = x.shape[0], _check_f("bulyan", f)
    _need("bulyan", n >= 4 * f + 3, "n >= 4f + 3", n, f)
    dist, _, _ = _pairwise(x)
    left = torch.ones(n, dtype=torch.bool)
    picked = []
    for _ in range(n - 2 * f):
        i = int(_smallest(_krum_scores(dist, f, left), 1)[0])
        picked.append(i)
        left[i] = False
    picked.sort()
    chosen = torch.from_numpy(x.numpy()[picked]) if x.device.type == "cpu" else x[picked]
    return _coordinatewise(chosen, "closest", n - 4 * f).to(x.device)


# --------------------------------------------------------------------------- pre-aggregators


@PRE_AGGREGATORS.register("nnm", keys=ByzantineKeys)
@_float_io
def nnm(x: Tensor, w: Tensor, f: int = 0) -> tuple[Tensor, Tensor]:
    """Nearest neighbour mixing: every input replaced by the mean of its n − f nearest inputs
    (itself included)."""
    n, f = x.shape[0], _check_f("nnm", f)
    _need("nnm", n > 2 * f, "n > 2f", n, f)
    if f == 0:
        return x.mean(0, keepdim=True).expand(n, -1).clone(), w
    dist, bad, to_ref = _pairwise(x)
    dist.fill_diagonal_(-1)  # a row is its own nearest neighbour
    if bad.any():  # a non-finite row takes the neighbours of the reference row
        dist[bad] = to_ref
        dist[:, bad] = INF
    nearest = torch.sort(dist, dim=1, stable=True).indices[:, :n - f]
    mix = torch.zeros(n, n, dtype=torch.float64).scatter_(1, nearest, 1.0 / (n - f))
    # rows with the same neighbourhood (often all the honest ones) are mixed once
    sets, inverse = torch.unique(mix != 0, dim=0, return_inverse=True)
    if len(sets) <= n // 2:
        mix = sets.double() / (n - f)
    out = _combine(x, mix, bad, threads=True)
    if len(sets) <= n // 2:
        out = torch.from_numpy(out.numpy()[inverse.numpy()]) if out.device.type == "cpu" else out[inverse.to(out.device)]
    return out, w


@PRE_AGGREGATORS.register("bucketing", keys=BucketingKeys)
@_float_io
def bucketing(x: Tensor, w: Tensor, s: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Averages of buckets of s inputs after a seeded random permutation (bucket of row 0 first)."""
    n = x.shape[0]
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
        raise ValueError(f"bucketing: s must be an integer >= 1, got s={s!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    bucket = torch.empty(n, dtype=torch.long)
    bucket[perm] = torch.arange(n) // s
    first = int(bucket[0])
    bucket = torch.where(bucket == first, 0, torch.where(bucket == 0, first, bucket))
    m = -(-n // s)
    counts = torch.zeros(m, dtype=x.dtype).index_add_(0, bucket, torch.ones(n, dtype=x.dtype))
    bucket_d = bucket.to(x.device)
    out = torch.zeros(m, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, bucket_d, x)
    out /= counts.to(x.device)[:, None]
    return out, torch.zeros(m, dtype=w.dtype, device=w.device).index_add_(0, bucket_d, w)


def _scale_rows(x: Tensor, scale: Tensor, bad: Tensor) -> Tensor:
    """x with row i scaled by scale_i (float64, 1: unchanged) and the bad rows set to 0
    (x itself when nothing changes)."""
    if not bool(((scale < 1) | bad).any()):
        return x
    out = x * scale.to(dtype=x.dtype, device=x.device)[:, None]
    if bad.any():
        out[bad.to(x.device)] = 0
    return out


@PRE_AGGREGATORS.register("arc", keys=ByzantineKeys)
@_float_io
def arc(x: Tensor, w: Tensor, f: int = 0) -> tuple[Tensor, Tensor]:
    """Adaptive robust clipping: the ⌊2(f/n)(n − f)⌋ largest-norm inputs clipped to the norm
    of the next largest."""
    n, f = x.shape[0], _check_f("arc", f)
    _need("arc", n > 2 * f, "n > 2f", n, f)
    k = 2 * f * (n - f) // n
    if k == 0:
        return x, w
    norms, bad = _row_norms(x)
    order = torch.sort(norms, descending=True, stable=True).indices
    threshold = norms[order[k]]
    scale = torch.ones(n, dtype=torch.float64)
    top = order[:k]
    scale[top] = torch.clamp(threshold / norms[top], max=1.0).nan_to_num(nan=1.0)  # 0/0: a zero row
    return _scale_rows(x, scale, bad), w


@PRE_AGGREGATORS.register("clipping", keys=ClippingKeys)
@_float_io
def clipping(x: Tensor, w: Tensor, threshold: float = 1.0) -> tuple[Tensor, Tensor]:
    """Every input scaled to norm ≤ threshold."""
    if not threshold > 0:
        raise ValueError(f"clipping: needs threshold > 0, got threshold={threshold}")
    norms, bad = _row_norms(x)
    scale = torch.clamp(threshold / norms, max=1.0)
    return _scale_rows(x, scale, bad), w
