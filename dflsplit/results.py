"""Results of a run: one JSON-lines file per node, appended each round, and a run summary.

Layout of a run folder::

    node_<uid>.jsonl   one record per round (never rewritten)
    node_<uid>.log     the node's log
    summary.json       written once at the end by the launcher
    config.yaml        the configuration as run (every key)
    graph.edges        the topology as run
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


def read_run(run_dir: str | Path) -> dict[int, list[dict[str, Any]]]:
    """uid → round records, for every node file in `run_dir`."""
    out = {}
    for p in sorted(Path(run_dir).glob("node_*.jsonl")):
        out[int(p.stem.split("_")[1])] = read_node_results(p)
    return out


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
