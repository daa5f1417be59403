"""Results of a run: one JSON-lines file per node, appended each round, and a run summary.

Layout of a run folder (one per run; every machine of the run writes its own subfolder)::

    summary.json               machine 0, at the end: every node of every machine
    machine_<id>/
        run.json               the run's identity: run id, config hash, machine id, machines
        config.yaml            the configuration as run (every key)
        graph.edges            the topology as run
        summary.json           this machine's nodes
        node_<uid>.jsonl       one record per round (appended, never rewritten)
        node_<uid>.log         the node's log

`read_run` also reads flat folders (node files directly in the run folder).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Iterable

ROUND_FIELDS = (
    "round", "train_loss", "test_loss", "test_acc", "bytes_sent", "bytes_received",
    "payload_bytes_sent", "payload_bytes_received", "metadata_bytes_sent", "metadata_bytes_received",
    "round_seconds", "eval_seconds", "wall_time",
)


def node_file(run_dir: str | Path, uid: int) -> Path:
    return Path(run_dir) / f"node_{uid}.jsonl"


class ResultsWriter:
    """Appends one JSON line per round to `node_<uid>.jsonl` and flushes it."""

    def __init__(self, run_dir: str | Path, uid: int):
        self.path = node_file(run_dir, uid)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def append(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_node_results(path: str | Path) -> list[dict[str, Any]]:
    """All round records of one node file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def machine_dir(run_dir: str | Path, machine_id: int) -> Path:
    """The subfolder of `run_dir` that machine `machine_id` writes."""
    return Path(run_dir) / f"machine_{machine_id}"


def node_files(run_dir: str | Path) -> dict[int, Path]:
    """uid → results file, for every node file in `run_dir` and its ``machine_*`` subfolders."""
    run_dir = Path(run_dir)
    out: dict[int, Path] = {}
    for p in sorted([*run_dir.glob("node_*.jsonl"), *run_dir.glob("machine_*/node_*.jsonl")]):
        try:
            uid = int(p.stem.split("_")[1])
        except (IndexError, ValueError):
            continue
        if uid in out:
            raise ValueError(f"{run_dir}: node {uid} has two results files, {out[uid]} and {p}")
        out[uid] = p
    return out


def read_run(run_dir: str | Path) -> dict[int, list[dict[str, Any]]]:
    """uid → round records, for every node file in `run_dir` (and its machine subfolders)."""
    return {uid: read_node_results(p) for uid, p in sorted(node_files(run_dir).items())}


def final_accuracies(run: dict[int, list[dict[str, Any]]]) -> dict[int, float]:
    """Each node's last recorded test accuracy."""
    accs = {}
    for uid, records in run.items():
        tested = [r["test_acc"] for r in records if r.get("test_acc") is not None]
        if tested:
            accs[uid] = tested[-1]
    return accs


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    vals = list(values)
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / "summary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path
