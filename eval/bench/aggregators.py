#!/usr/bin/env python3
"""Robust aggregation benchmark: dflsplit's aggregators and pre-aggregators against the plain
mean, recorded ByzPy 0.1.4 figures and (where importable) ByzFL, timed in this invocation.

Method: n = 64 vectors of d = 65,536 float32 coordinates (48 honest rows: a common random
point plus N(0, 0.1²) noise; 16 Byzantine rows: the same shifted by +1 in every coordinate),
f = 16 (bulyan: f = 15, it needs n ≥ 4f + 3), ``torch.set_num_threads(2)``. Each rule is
called once to warm up, then timed over 5 calls (``time.perf_counter``); the figure is the
median. Every rule runs on the same tensor; rules that modify their input in place (ByzFL's
ARC and Clipping) get a fresh copy before each call, made outside the timed region (their
time with the copy inside is given too); ByzFL rules are built anew for every call. ByzFL's
implementation of the same rule is timed in the same run, on the same inputs given both as
a torch tensor and as a NumPy array; the faster is shown, with which it was. The ByzPy
figures are recorded reference values (ByzPy 0.1.4), not measured here; the
target is at most half of each.

Usage::

    python eval/bench/aggregators.py [--calls 5] [--out FILE]

The table goes to eval/bench/results/aggregators.txt.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dflsplit.sharing import robust  # noqa: E402  (registers the robust rules)
from dflsplit.sharing.aggregators import AGGREGATORS, PRE_AGGREGATORS  # noqa: E402

N, D, F = 64, 65_536, 16
BYZPY = {  # recorded ByzPy 0.1.4 figures, ms (same n, d, f)
    "mean": 1.2, "median": 38, "trimmed_mean": 195, "meamed": 277, "multikrum": 7.1, "geometric_median": 84,
    "centered_clipping": 54, "monna": 24, "nnm": 14, "caf": 35,
}


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(D, generator=g)
    x = base + 0.1 * torch.randn(N, D, generator=g)
    x[N - F:] += 1.0
    return x.contiguous(), torch.full((N,), 1.0 / N)


def timed(fn, setup=None, calls: int = 5) -> float:
    """Median wall time (ms) of `calls` calls of fn(setup()) after one warm-up call."""
    fn(setup() if setup else None)
    times = []
    for _ in range(calls):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def byzfl_rules(byzfl, x: torch.Tensor) -> dict:
    """rule name → (ByzFL constructor, its parameters as text, modifies its input)."""
    norm = float(torch.linalg.vector_norm(x, dim=1).median())
    return {
        "mean": (lambda: byzfl.Average(), "", False),
        "median": (lambda: byzfl.Median(), "", False),
        "trimmed_mean": (lambda: byzfl.TrMean(f=F), f"f={F}", False),
        "meamed": (lambda: byzfl.Meamed(f=F), f"f={F}", False),
        "krum": (lambda: byzfl.Krum(f=F), f"f={F}", False),
        "multikrum": (lambda: byzfl.MultiKrum(f=F), f"f={F}", False),
        "geometric_median": (lambda: byzfl.GeometricMedian(), "nu=0.1, T=3 (defaults)", False),
        "centered_clipping": (lambda: byzfl.CenteredClipping(L=1, tau=10.0), "L=1, tau=10, from 0", False),
        "monna": (lambda: byzfl.MoNNA(f=F, idx=0), f"f={F}, idx=0", False),
        "caf": (lambda: byzfl.CAF(f=F), f"f={F}", False),
        "nnm": (lambda: byzfl.NNM(f=F), f"f={F}", False),
        "bucketing": (lambda: byzfl.Bucketing(s=2), "s=2", False),
        "arc": (lambda: byzfl.ARC(f=F), f"f={F}", True),
        "clipping": (lambda: byzfl.Clipping(c=norm), "c=median norm", True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "eval/bench/results/aggregators.txt"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_before = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    x, w = inputs()
    xn = x.numpy()
    norm = float(torch.linalg.vector_norm(x, dim=1).median())
    try:
        import byzfl
        byzfl_version = getattr(byzfl, "__version__", None)
        if byzfl_version is None:
            from importlib.metadata import version
            byzfl_version = version("byzfl")
        theirs = byzfl_rules(byzfl, x)
        byzfl_note = f"ByzFL {byzfl_version}"
    except Exception as e:  # noqa: BLE001 - any import failure: run without it
        theirs, byzfl_note = {}, f"ByzFL not importable ({type(e).__name__}: {e})"

    ours = [  # (rule, pre-aggregator?, keys, keys as text)
        ("mean", False, {}, ""),
        ("median", False, {}, ""),
        ("trimmed_mean", False, {"f": F}, f"f={F}"),
        ("meamed", False, {"f": F}, f"f={F}"),
        ("krum", False, {"f": F}, f"f={F}"),
        ("multikrum", False, {"f": F}, f"f={F}, m=n-f"),
        ("geometric_median", False, {}, "eps=1e-6, tol=1e-6, max_iter=100"),
        ("centered_clipping", False, {"start": "zero", "tau": 10.0, "iterations": 1}, "tau=10, L=1, from 0"),
        ("cge", False, {"f": F}, f"f={F}"),
        ("monna", False, {"f": F}, f"f={F}"),
        ("caf", False, {"f": F}, f"f={F}"),
        ("bulyan", False, {"f": F - 1}, f"f={F - 1}"),
        ("nnm", True, {"f": F}, f"f={F}"),
        ("bucketing", True, {"s": 2}, "s=2"),
        ("arc", True, {"f": F}, f"f={F}"),
        ("clipping", True, {"threshold": norm}, "threshold=median norm"),
    ]
    rows, mean_ms = [], None
    for name, pre, keys, keys_text in ours:
        rule = (PRE_AGGREGATORS if pre else AGGREGATORS).get(name)
        ms = timed(lambda _: rule(x, w, **keys), calls=args.calls)
        if name == "mean":
            mean_ms = ms
        their_ms = their_kind = their_text = None
        if name in theirs:
            make, their_text, mutates = theirs[name]
            best = None
            for kind, data in (("torch", x), ("numpy", xn)):
                copy = (lambda data=data: data.copy() if isinstance(data, np.ndarray) else data.clone())
                # a new instance per call (ByzFL's CenteredClipping keeps its last output as its next start)
                t = timed(lambda arg, data=data: make()(arg if arg is not None else data),
                          copy if mutates else None, args.calls)
                if best is None or t < best[0]:
                    best = (t, kind, copy)
            their_ms, their_kind, copy = best
            if mutates:  # what it costs when, like ours, it leaves its input as it was
                with_copy = timed(lambda _: make()(copy()), calls=args.calls)
                their_text += f"; modifies its input: {with_copy:.2f} ms with the copy"
        rows.append((name, "pre" if pre else "agg", keys_text, ms, their_ms, their_kind, their_text))
        print(f"{name:18s} {ms:9.2f} ms" + (f"   ByzFL ({their_kind}) {their_ms:9.2f} ms" if their_ms else ""), flush=True)

    load_after = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    lines = [
        f"# eval/bench/aggregators.py, {datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}, numpy {np.__version__}, {byzfl_note}",
        f"# method: n={N}, d={D}, f={F} (bulyan f={F - 1}), float32; 48 honest rows (a random point + N(0, 0.1^2)), "
        f"16 Byzantine (the same + 1); one warm-up call, then the median of {args.calls} timed calls;",
        "# 'ours' and 'ByzFL' measured in this run on the same inputs (ByzFL: the faster of a torch tensor or a NumPy",
        "# array as input, named); 'ByzPy 0.1.4' = recorded reference values, not measured here; target = ByzPy / 2.",
        f"# plain mean measured in this run: {mean_ms:.2f} ms (ByzPy 0.1.4 recorded: {BYZPY['mean']} ms); "
        f"load average (1, 5, 15 min) before: {' '.join(load_before)}, after: {' '.join(load_after)}",
        "",
        f"{'rule':18s} {'kind':4s} {'keys':34s} {'ours ms':>8s} {'x mean':>7s} {'ByzPy rec.':>10s} "
        f"{'target':>7s} {'met':>4s} {'ByzFL ms':>9s} {'ByzFL in':>8s} {'ByzFL/ours':>10s}  ByzFL keys",
    ]
    for name, kind, keys_text, ms, their_ms, their_kind, their_text in rows:
        ref = BYZPY.get(name)
        target = ref / 2 if ref is not None and name != "mean" else None
        met = "" if target is None else ("yes" if ms <= target else "NO")
        lines.append(
            f"{name:18s} {kind:4s} {keys_text:34s} {ms:8.2f} {ms / mean_ms:7.1f} "
            f"{(f'{ref:g}' if ref is not None else '-'):>10s} {(f'{target:g}' if target else '-'):>7s} {met:>4s} "
            f"{(f'{their_ms:.2f}' if their_ms else '-'):>9s} {(their_kind or '-'):>8s} "
            f"{(f'{their_ms / ms:.1f}x' if their_ms else '-'):>10s}  {their_text or ''}")
    # the floor of the distance-based rules on this machine: their Gram matrix, and the float32
    # matrix-product rate that bounds it (n(n+1)d flops as syrk)
    gram_ms = timed(lambda _: robust._shifted_gram(x), calls=args.calls)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    gflops = 2 * 1024 ** 3 / (timed(lambda _: a @ b, calls=args.calls) * 1e-3) / 1e9
    floor_ms = N * (N + 1) * D / (gflops * 1e9) * 1e3
    missed_byzpy = [r[0] for r in rows if r[0] in BYZPY and r[0] != "mean" and r[3] > BYZPY[r[0]] / 2]
    slower_byzfl = [r[0] for r in rows if r[4] is not None and r[0] != "mean" and r[3] >= r[4]]
    lines += ["", f"# ByzPy target (<= half) missed by: {', '.join(missed_byzpy) or 'none'}",
              f"# not faster than ByzFL: {', '.join(slower_byzfl) or 'none'}",
              f"# the pairwise-distance step alone (Gram matrix of the rows minus row 0, as used by krum, multikrum, "
              f"nnm, caf, geometric_median, bulyan): {gram_ms:.2f} ms;",
              f"# this machine's float32 matrix product (1024^3, {torch.get_num_threads()} threads): {gflops:.0f} GFLOP/s, "
              f"so the n(n+1)d = {N * (N + 1) * D / 1e6:.0f} Mflop of that Gram take >= {floor_ms:.2f} ms at that rate"]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
