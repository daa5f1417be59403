"""Compare runs: accuracy and loss against round, bytes per node and wall time, as PNG and CSV.

Every point is the mean ± std over the honest nodes that recorded the metric in that round
(all machines of a run: `read_run` reads its ``machine_<id>/`` subfolders). Its x is the
round, or the mean over those nodes of the bytes each sent and received so far, or of the
seconds since each node's first round started (a node's own clock: ``wall_time`` minus
``round_seconds`` and ``eval_seconds`` of its first record, so machines' clocks need not
agree). Nodes whose records say ``"byzantine": true`` are left out.

For each metric and x axis one PNG (one curve per run) and the CSV behind it::

    <metric>.png / .csv               against round
    <metric>_vs_bytes.png / .csv      against bytes per node (sent + received)
    <metric>_vs_time.png / .csv       against seconds since the first round started

with CSV columns ``run, <x>, mean, std, nodes``; plus each run's per-round table
(``metrics.csv``, or ``metrics_<label>.csv`` when there are several runs).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Sequence

from .results import mean_std, read_run

METRICS = ("train_loss", "test_loss", "test_acc", "train_acc")  # train_acc: with node.eval_train
METRIC_LABELS = {
    "test_acc": "test accuracy", "test_loss": "test loss", "train_loss": "train loss",
    "train_acc": "accuracy on own training shard",
}
# x axis: (CSV column, file name suffix, axis label)
AXES = {
    "round": ("round", "", "round"),
    "bytes": ("bytes_per_node", "_vs_bytes", "bytes per node (sent + received)"),
    "time": ("seconds", "_vs_time", "seconds since the node's first round started"),
}


def honest_run(run_dir: str | Path) -> tuple[dict[int, list[dict]], list[int]]:
    """The records of the honest nodes of a run, and the uids of the Byzantine ones (whose
    records say ``"byzantine": true``)."""
    run = read_run(run_dir)
    byzantine = sorted(u for u, rs in run.items() if any(r.get("byzantine") for r in rs))
    return {u: rs for u, rs in run.items() if u not in byzantine}, byzantine


def _honest_or_fail(run_dir: str | Path) -> tuple[dict[int, list[dict]], list[int]]:
    run, byzantine = honest_run(run_dir)
    if not run:
        raise FileNotFoundError(
            f"{run_dir}: no node_*.jsonl result files of honest nodes (in it or in its machine_*/ subfolders)"
        )
    return run, byzantine


def node_x(records: list[dict]) -> list[dict[str, float]]:
    """Per record of one node: its round, bytes sent + received so far, and seconds since the
    node's first round started (None without ``wall_time``)."""
    first = records[0] if records else {}
    start = None
    if first.get("wall_time") is not None:
        start = first["wall_time"] - first.get("round_seconds", 0.0) - first.get("eval_seconds", 0.0)
    return [
        {
            "round": r["round"],
            "bytes": r.get("bytes_sent", 0) + r.get("bytes_received", 0),
            "time": (r["wall_time"] - start) if start is not None and r.get("wall_time") is not None else None,
        }
        for r in records
    ]


def curve(run: dict[int, list[dict]], metric: str, axis: str) -> list[dict]:
    """Points of `metric` against `axis` ('round', 'bytes' or 'time') over the nodes of `run`
    (uid → records): one per round in which some node recorded the metric, with x (mean over
    those nodes), mean, std (population) and nodes."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for records in run.values():
        for r, xs in zip(records, node_x(records)):
            if r.get(metric) is None or xs[axis] is None:
                continue
            by_round.setdefault(r["round"], []).append((xs[axis], r[metric]))
    points = []
    for rnd in sorted(by_round):
        pairs = by_round[rnd]
        mean, std = mean_std(v for _, v in pairs)
        x = rnd if axis == "round" else mean_std(x for x, _ in pairs)[0]
        points.append({"x": x, "mean": mean, "std": std, "nodes": len(pairs)})
    return points


def aggregate_rounds(run_dir: str | Path) -> list[dict]:
    """One row per round: mean/std over the honest nodes of each metric, of bytes
    sent+received per node and of seconds since the node's first round started
    (Byzantine nodes are left out)."""
    run, _ = _honest_or_fail(run_dir)
    by_round: dict[int, list[tuple[dict, dict]]] = {}
    for records in run.values():
        for r, xs in zip(records, node_x(records)):
            by_round.setdefault(r["round"], []).append((r, xs))
    rows = []
    for rnd in sorted(by_round):
        pairs = by_round[rnd]
        recs = [r for r, _ in pairs]
        row = {"round": rnd, "nodes": len(recs)}
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(r[m] for r in recs if r.get(m) is not None)
        row["bytes_mean"], row["bytes_std"] = mean_std(xs["bytes"] for _, xs in pairs)
        row["round_seconds_mean"], _ = mean_std(r["round_seconds"] for r in recs if "round_seconds" in r)
        row["seconds_mean"], _ = mean_std(xs["time"] for _, xs in pairs if xs["time"] is not None)
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path,
              labels: Sequence[str] | None = None) -> list[Path]:
    """Compare runs: for each metric some run recorded and each x axis, a PNG with one curve
    per run (mean ± std over nodes, shaded) and the CSV behind it, plus each run's
    per-round table. `labels` name the runs in legends and CSVs (default: the folders'
    names). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("plot: give at least one run folder")
    labels = [d.name for d in run_dirs] if labels is None else list(labels)
    if len(labels) != len(run_dirs):
        raise ValueError(f"plot: {len(labels)} labels for {len(run_dirs)} runs; give --label once per RUN")
    repeated = sorted({l for l in labels if labels.count(l) > 1})
    if repeated:
        raise ValueError(f"plot: two runs are labelled {repeated[0]!r}; tell them apart with --label")
    runs, byzantine = {}, {}
    for label, d in zip(labels, run_dirs):
        runs[label], byzantine[label] = _honest_or_fail(d)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for label, d in zip(labels, run_dirs):
        name = "metrics.csv" if len(run_dirs) == 1 else f"metrics_{_file_label(label)}.csv"
        written.append(write_csv(aggregate_rounds(d), out / name))

    left_out = "; ".join(
        (f"{', '.join(map(str, b))}" if len(runs) == 1 else f"{l}: {', '.join(map(str, b))}")
        for l, b in byzantine.items() if b
    )
    note = f"\n(honest nodes; Byzantine {left_out} left out)" if left_out else ""
    for metric in ("test_acc", "test_loss", "train_loss", "train_acc"):
        for axis, (column, suffix, xlabel) in AXES.items():
            curves = {l: curve(run, metric, axis) for l, run in runs.items()}
            curves = {l: pts for l, pts in curves.items() if pts}
            if not curves:
                continue
            stem = out / f"{metric}{suffix}"
            with open(stem.with_suffix(".csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["run", column, "mean", "std", "nodes"])
                for l, pts in curves.items():
                    w.writerows([l, p["x"], p["mean"], p["std"], p["nodes"]] for p in pts)
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for l, pts in curves.items():
                x = [p["x"] for p in pts]
                y = [p["mean"] for p in pts]
                s = [p["std"] for p in pts]
                (line,) = ax.plot(x, y, marker="o", ms=3, label=l)
                ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)],
                                color=line.get_color(), alpha=0.2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{METRIC_LABELS[metric]} (mean ± std over nodes)")
            ax.grid(alpha=0.3)
            ax.legend()
            title = METRIC_LABELS[metric] if len(runs) > 1 else f"{labels[0]}: {METRIC_LABELS[metric]}"
            ax.set_title(title + note, fontsize=10)
            fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.86)  # fixed: tight_layout draws twice
            fig.savefig(stem.with_suffix(".png"), dpi=100)
            plt.close(fig)
            written += [stem.with_suffix(".csv"), stem.with_suffix(".png")]
    return written


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write metrics.csv and, per metric and x axis, a PNG and its CSV for one run into
    `out_dir` (default: the run folder); return the paths written."""
    return plot_runs([run_dir], out_dir or run_dir)


def add_plot_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a run folder (node_*.jsonl, or machine_<id>/ subfolders holding them)")
    parser.add_argument("--label", action="append", metavar="L",
                        help="the name of a run in legends and CSVs, once per RUN in order (default: the folder's name)")
    parser.add_argument("--out", metavar="DIR",
                        help="where to write (default: the run folder with one RUN, ./plots with several)")


def run_plot(args) -> int:
    out = args.out or (args.runs[0] if len(args.runs) == 1 else "plots")
    for p in plot_runs(args.runs, out, args.label):
        print(p)
    return 0


def plot_main(argv=None) -> int:
    """`eval/plot.py RUN [RUN...] [--label L ...] [--out DIR]`: the same as `dflsplit plot`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plot_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_plot(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 2
