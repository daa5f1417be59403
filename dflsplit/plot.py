"""Turn a run folder into CSV and PNG: accuracy and loss against round and against bytes.

Each metric is the mean ± std over the nodes that recorded it in that round.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .results import mean_std, read_run

METRICS = ("train_loss", "test_loss", "test_acc", "train_acc")  # train_acc: with node.eval_train


def honest_run(run_dir: str | Path) -> tuple[dict[int, list[dict]], list[int]]:
    """The records of the honest nodes of a run, and the uids of the Byzantine ones (whose
    records say ``"byzantine": true``)."""
    run = read_run(run_dir)
    byzantine = sorted(u for u, rs in run.items() if any(r.get("byzantine") for r in rs))
    return {u: rs for u, rs in run.items() if u not in byzantine}, byzantine


def aggregate_rounds(run_dir: str | Path) -> list[dict]:
    """One row per round: mean/std over the honest nodes of each metric and of bytes
    sent+received per node (Byzantine nodes are left out)."""
    run, _ = honest_run(run_dir)
    if not run:
        raise FileNotFoundError(f"{run_dir}: no node_*.jsonl result files of honest nodes")
    by_round: dict[int, list[dict]] = {}
    for records in run.values():
        for r in records:
            by_round.setdefault(r["round"], []).append(r)
    rows = []
    for rnd in sorted(by_round):
        recs = by_round[rnd]
        row = {"round": rnd, "nodes": len(recs)}
        for m in METRICS:
            mean, std = mean_std(r[m] for r in recs if r.get(m) is not None)
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        row["bytes_mean"], row["bytes_std"] = mean_std(r["bytes_sent"] + r["bytes_received"] for r in recs)
        row["round_seconds_mean"], _ = mean_std(r["round_seconds"] for r in recs)
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write metrics.csv and accuracy/loss PNGs for `run_dir`; return the paths written."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate_rounds(run_dir)
    _, byzantine = honest_run(run_dir)
    written = [write_csv(rows, out / "metrics.csv")]
    plots = (("test_acc", "test accuracy"), ("test_loss", "test loss"), ("train_loss", "train loss"),
             ("train_acc", "accuracy on own training shard"))
    for metric, label in plots:
        pts = [r for r in rows if not math.isnan(r[f"{metric}_mean"])]
        if not pts:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, xkey, xlabel in ((axes[0], "round", "round"), (axes[1], "bytes_mean", "bytes per node (sent + received)")):
            x = [r[xkey] for r in pts]
            y = [r[f"{metric}_mean"] for r in pts]
            s = [r[f"{metric}_std"] for r in pts]
            ax.plot(x, y, marker="o", ms=3)
            ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], alpha=0.25)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{label} (mean ± std over nodes)")
            ax.grid(alpha=0.3)
        note = f" (honest nodes; Byzantine {', '.join(map(str, byzantine))} left out)" if byzantine else ""
        fig.suptitle(f"{Path(run_dir).name}: {label}{note}")
        fig.tight_layout()
        path = out / f"{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def add_plot_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run folder (holding node_*.jsonl)")
    parser.add_argument("--out", help="where to write (default: the run folder)")


def run_plot(args) -> int:
    for p in plot_run(args.run_dir, args.out):
        print(p)
    return 0


def plot_main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__)
    add_plot_arguments(parser)
    return run_plot(parser.parse_args(argv))
