"""`dflsplit plot` / `eval/plot.py`: runs compared in one figure per metric and x axis, the
CSV behind each checked against mean/std computed here from the node files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest

from dflsplit.plot import plot_run, plot_runs
from dflsplit.results import ROUND_FIELDS, ResultsWriter, machine_dir

REPO = Path(__file__).resolve().parents[1]
METRICS = ("test_acc", "test_loss", "train_loss", "train_acc")
AXES = {"": "round", "_vs_bytes": "bytes_per_node", "_vs_time": "seconds"}


def write_run(run_dir: Path, nodes: int, rounds: int, seed: int, machines: int = 1, test_every: int = 2,
              train_acc: bool = True, byzantine: tuple[int, ...] = ()) -> None:
    """Node files in the real format (ResultsWriter, every round field), nodes spread over
    `machines` machine_<id>/ folders when machines > 1; each machine's clock is offset by
    an hour so only per-node times agree."""
    rng = np.random.default_rng(seed)
    for uid in range(nodes):
        machine = uid % machines
        folder = machine_dir(run_dir, machine) if machines > 1 else run_dir
        w = ResultsWriter(folder, uid)
        clock = 1.7e9 + 3600 * machine + rng.uniform(0, 5)
        sent = received = 0
        for r in range(rounds):
            round_s, eval_s = rng.uniform(0.1, 0.5), 0.0
            tested = (r + 1) % test_every == 0 or r == rounds - 1
            if tested:
                eval_s = rng.uniform(0.01, 0.05)
            clock += round_s + eval_s
            sent += int(rng.integers(1000, 2000))
            received += int(rng.integers(1000, 2000))
            record = {"round": r, "train_loss": float(rng.uniform(0.1, 2)), "round_seconds": round_s,
                      "test_loss": float(rng.uniform(0.1, 2)) if tested else None,
                      "test_acc": float(rng.uniform(0, 1)) if tested else None, "eval_seconds": eval_s,
                      "bytes_sent": sent, "bytes_received": received, "payload_bytes_sent": sent - 100,
                      "payload_bytes_received": received - 100, "metadata_bytes_sent": 100,
                      "metadata_bytes_received": 100, "wall_time": clock}
            if tested and train_acc:
                record["train_acc"] = float(rng.uniform(0, 1))
            if uid in byzantine:
                record["byzantine"] = True
            assert set(ROUND_FIELDS) <= set(record)
            w.append(record)
        w.close()


def node_records(run_dir: Path) -> dict[int, list[dict]]:
    files = list(run_dir.glob("node_*.jsonl")) + list(run_dir.glob("machine_*/node_*.jsonl"))
    return {int(p.stem.split("_")[1]): [json.loads(line) for line in p.read_text().splitlines()] for p in files}


def expected(run_dir: Path, metric: str, axis: str) -> list[tuple[float, float, float, int]]:
    """(x, mean, std, nodes) per round, straight from the node files (honest nodes only)."""
    nodes = {u: rs for u, rs in node_records(run_dir).items() if not any(r.get("byzantine") for r in rs)}
    rows = []
    for rnd in sorted({r["round"] for rs in nodes.values() for r in rs}):
        xs, vals = [], []
        for rs in nodes.values():
            start = rs[0]["wall_time"] - rs[0]["round_seconds"] - rs[0]["eval_seconds"]
            for r in rs:
                if r["round"] == rnd and r.get(metric) is not None:
                    vals.append(r[metric])
                    xs.append({"round": rnd, "bytes_per_node": r["bytes_sent"] + r["bytes_received"],
                               "seconds": r["wall_time"] - start}[axis])
        if vals:
            rows.append((statistics.fmean(xs), statistics.fmean(vals), statistics.pstdev(vals), len(vals)))
    return rows


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def check_csv(path: Path, runs: dict[str, Path], metric: str, column: str) -> None:
    rows = read_csv(path)
    assert list(rows[0]) == ["run", column, "mean", "std", "nodes"]
    for label, run_dir in runs.items():
        mine = [(float(r[column]), float(r["mean"]), float(r["std"]), int(r["nodes"])) for r in rows if r["run"] == label]
        want = expected(run_dir, metric, column)
        assert len(mine) == len(want) > 0
        for got, exp in zip(mine, want):
            assert got[:3] == pytest.approx(exp[:3], rel=1e-9, abs=1e-12) and got[3] == exp[3]


@pytest.fixture
def figures(monkeypatch):
    """Every saved figure's file name -> (legend labels, number of curves) of its axes."""
    seen = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, path, *a, **k):
        ax = fig.axes[0]
        legend = ax.get_legend()
        seen[Path(path).name] = ([t.get_text() for t in legend.get_texts()] if legend else [], len(ax.lines),
                                 ax.get_title())
        return save(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return seen


def test_two_runs_one_figure_per_metric_and_axis_with_csvs_from_the_node_files(tmp_path, figures):
    runs = {"fast": tmp_path / "run-a", "slow": tmp_path / "run-b"}
    write_run(runs["fast"], nodes=4, rounds=6, seed=1)
    write_run(runs["slow"], nodes=5, rounds=4, seed=2, test_every=3, train_acc=False)
    written = plot_runs(list(runs.values()), tmp_path / "out", labels=list(runs))
    names = {p.name for p in written}
    assert {"metrics_fast.csv", "metrics_slow.csv"} <= names
    for metric in METRICS:
        for suffix, column in AXES.items():
            png, table = f"{metric}{suffix}.png", f"{metric}{suffix}.csv"
            assert {png, table} <= names and (tmp_path / "out" / png).stat().st_size > 0
            recorded = {l: d for l, d in runs.items() if metric != "train_acc" or l == "fast"}
            check_csv(tmp_path / "out" / table, recorded, metric, column)
            legend, curves, title = figures[png]
            assert legend == list(recorded) and curves == len(recorded)
            assert "Byzantine" not in title
    per_run = read_csv(tmp_path / "out" / "metrics_slow.csv")
    assert [int(r["round"]) for r in per_run] == [0, 1, 2, 3] and {r["nodes"] for r in per_run} == {"5"}


def test_a_run_on_two_machines_counts_all_its_nodes_and_byzantine_ones_are_left_out(tmp_path, figures):
    flat, split = tmp_path / "flat", tmp_path / "split"
    write_run(flat, nodes=6, rounds=4, seed=3)
    write_run(split, nodes=6, rounds=4, seed=3, machines=2)
    assert sorted(p.name for p in split.iterdir()) == ["machine_0", "machine_1"]
    plot_runs([flat, split], tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "test_acc.csv")
    assert {r["nodes"] for r in rows} == {"6"} and {r["run"] for r in rows} == {"flat", "split"}
    for metric in METRICS:
        for suffix, column in AXES.items():
            check_csv(tmp_path / "out" / f"{metric}{suffix}.csv", {"split": split, "flat": flat}, metric, column)
            rows = read_csv(tmp_path / "out" / f"{metric}{suffix}.csv")
            strip = lambda label: [{k: v for k, v in r.items() if k != "run"} for r in rows if r["run"] == label]
            assert strip("flat") == strip("split")  # the same nodes, one folder or two
    # seconds count from each node's own first round, not across the machines' clocks (an hour apart)
    assert max(float(r["seconds"]) for r in read_csv(tmp_path / "out" / "test_acc_vs_time.csv")) < 10

    hostile = tmp_path / "hostile"
    write_run(hostile, nodes=6, rounds=4, seed=3, machines=2, byzantine=(1, 4))
    plot_run(hostile)
    check_csv(hostile / "test_acc.csv", {"hostile": hostile}, "test_acc", "round")
    assert {r["nodes"] for r in read_csv(hostile / "test_acc.csv")} == {"4"}
    assert "Byzantine 1, 4 left out" in figures["test_acc.png"][2]
    assert {r["nodes"] for r in read_csv(hostile / "metrics.csv")} == {"4"}


def test_cli_and_eval_plot_py_as_the_readme_writes_them(tmp_path):
    a, b = tmp_path / "lr-0.1", tmp_path / "lr-0.01"
    write_run(a, nodes=3, rounds=3, seed=5)
    write_run(b, nodes=3, rounds=3, seed=6, machines=3)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cli = subprocess.run([sys.executable, "-m", "dflsplit.cli", "plot", str(a), str(b), "--label", "A",
                          "--label", "B", "--out", str(tmp_path / "cli")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert str(tmp_path / "cli" / "test_acc.png") in cli.stdout.split()
    check_csv(tmp_path / "cli" / "test_acc.csv", {"A": a, "B": b}, "test_acc", "round")
    assert os.access(REPO / "eval" / "plot.py", os.X_OK)
    script = subprocess.run([str(REPO / "eval" / "plot.py"), str(a), str(b), "--out", str(tmp_path / "script")],
                            capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    check_csv(tmp_path / "script" / "train_loss_vs_bytes.csv", {"lr-0.1": a, "lr-0.01": b}, "train_loss", "bytes_per_node")


def test_plot_errors_name_the_problem(tmp_path, capsys):
    from dflsplit.cli import main as cli_main
    from dflsplit.plot import plot_main

    a = tmp_path / "lr-0.1"
    write_run(a, nodes=2, rounds=2, seed=7)
    assert cli_main(["plot", str(a), str(a), "--label", "A"]) == 2
    assert "dflsplit plot: error: plot: 1 labels for 2 runs; give --label once per RUN" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert plot_main([str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'}: no node_*.jsonl result files" in capsys.readouterr().err
    shutil.copytree(a, tmp_path / "x" / "lr-0.1")
    assert cli_main(["plot", str(a), str(tmp_path / "x" / "lr-0.1"), "--out", str(tmp_path / "o")]) == 2
    assert "two runs are labelled 'lr-0.1'; tell them apart with --label" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert plot_main([str(a)]) == 0  # one run: into its own folder, as before
    assert (a / "metrics.csv").is_file() and (a / "test_acc_vs_time.png").is_file()


@pytest.mark.slow
def test_two_real_runs_on_digits(tmp_path, figures):
    from conftest import next_base_port

    from dflsplit.config import load_config
    from dflsplit.launch import run_experiment

    runs = {}
    for lr in ("0.05", "0.01"):
        cfg = load_config(REPO / "eval/configs/default.yaml", [
            f"run.base_port={next_base_port(4)}", "run.progress=false", "run.procs_per_machine=4", "run.rounds=3",
            "graph.degree=2", "node.test_after=1", "communication.name=tcp", "model.name=mlp", f"optimizer.lr={lr}"])
        runs[f"lr={lr}"] = tmp_path / f"lr-{lr}"
        run_experiment(cfg, runs[f"lr={lr}"])
    plot_runs(list(runs.values()), tmp_path / "out", labels=list(runs))
    for metric in ("test_acc", "test_loss", "train_loss"):
        for suffix, column in AXES.items():
            check_csv(tmp_path / "out" / f"{metric}{suffix}.csv", runs, metric, column)
            assert figures[f"{metric}{suffix}.png"][:2] == (list(runs), 2)
    assert {r["nodes"] for r in read_csv(tmp_path / "out" / "test_acc.csv")} == {"4"}
