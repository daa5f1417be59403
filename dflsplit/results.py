"""Results of a run: one JSON-lines file per node, appended each round, and a run summary.

Layout of a run folder (one per run; every machine of the run writes its own subfolder)::

    summary.json               machine 0, at the end: every node of every machine
    machine_<id>/
        run.json               the run's identity: run id, config hash, machine id, machines
        config.yaml            the configuration as run (every key)
        graph.edges            the topology as run
        summary.json           this machine's nodes
        pids.json              node uid → process id
        node_<uid>.jsonl       one record per round (appended, never rewritten)
        node_<uid>.log         the node's log
        checkpoints/           each node's last checkpoint (run.checkpoint_every)
        trace_<uid>.json       split.trace: the node's timeline (Chrome trace events)
        trace.json             split.trace: this machine's timelines in one

`read_run` also reads flat folders (node files directly in the run folder).
"""

from __future__ import annotations

import json
import math
import os
import re
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


def merge_traces(folder: str | Path) -> Path | None:
    """Write the events of every ``trace_<uid>.json`` in `folder` (the nodes' timelines,
    ``split.trace``) to ``trace.json`` there, one file for ui.perfetto.dev or
    chrome://tracing; None when there are none."""
    folder = Path(folder)
    parts = sorted((p for p in folder.glob("trace_*.json") if re.fullmatch(r"trace_\d+\.json", p.name)),
                   key=lambda p: int(p.stem.split("_")[1]))
    if not parts:
        return None
    events = [e for part in parts for e in json.loads(part.read_text())["traceEvents"]]
    path, tmp = folder / "trace.json", folder / "trace.json.tmp"
    tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    os.replace(tmp, path)
    return path


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write `summary` to ``<run_dir>/summary.json`` atomically."""
    return write_json(Path(run_dir) / "summary.json", summary)


def median(values: Iterable[float]) -> float | None:
    """The median of `values` (None when empty)."""
    v = sorted(values)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def summarize(run: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """What a run's summary says of its nodes, computed from their round records: node
    count, the honest nodes' final test accuracy (mean, spread, per node), median round
    time without and with evaluation, and the bytes all nodes sent and received."""
    byzantine = sorted(u for u, rs in run.items() if any(r.get("byzantine") for r in rs))
    accs = {u: a for u, a in final_accuracies(run).items() if u not in byzantine}
    acc_mean, acc_std = mean_std(accs.values())
    plain = [r["round_seconds"] for rs in run.values() for r in rs if r.get("test_acc") is None]
    with_eval = [r["round_seconds"] + r["eval_seconds"] for rs in run.values() for r in rs
                 if r.get("test_acc") is not None]
    return {
        "nodes": len(run),
        "median_round_seconds": median(plain),
        "median_eval_round_seconds": median(with_eval),
        "test_acc_mean": acc_mean,
        "test_acc_std": acc_std,
        "final_test_acc": {str(u): a for u, a in sorted(accs.items())},
        "byzantine": byzantine,
        "accuracy_over": "honest nodes" if byzantine else "all nodes",
        "bytes_sent": sum(rs[-1]["bytes_sent"] for rs in run.values() if rs),
        "bytes_received": sum(rs[-1]["bytes_received"] for rs in run.values() if rs),
        "rejected": sum(rs[-1].get("rejected", 0) for rs in run.values() if rs),
    }


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file ({} when the file does not exist)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` to `path` atomically (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def merge_runs(sources: list[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Merge copies of one run's folders (e.g. each machine's, copied to one place) into
    `out` (default: the first source): every ``machine_<id>/`` folder found is copied in
    (an existing one is kept when identical, an error when it differs), then the summary
    of every node is written to ``out/summary.json`` and returned.

    Raises ValueError when the sources belong to different runs (their run.json ids
    differ) or a node's results appear twice with different content.
    """
    import filecmp
    import shutil

    sources = [Path(s) for s in sources]
    for s in sources:
        if not s.is_dir():
            raise FileNotFoundError(f"{s}: not a run folder")
    out = Path(out) if out is not None else sources[0]
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Path] = {}
    machine_dirs: list[Path] = []
    for s in sources:
        found = sorted(p for p in s.glob("machine_*") if p.is_dir())
        if not found and (s / "run.json").is_file() and s.name.startswith("machine_"):
            found = [s]  # a machine folder given on its own
        for d in found:
            info = read_json(d / "run.json")
            if info.get("run_id"):
                runs.setdefault(str(info["run_id"]), d)
            machine_dirs.append(d)
    if len(runs) > 1:
        listed = "; ".join(f"{rid} ({d})" for rid, d in runs.items())
        raise ValueError(f"the folders hold different runs: {listed}")
    if not machine_dirs:
        raise FileNotFoundError(f"no machine_<id> folders under {', '.join(map(str, sources))}")
    for d in machine_dirs:
        target = out / d.name
        if d.resolve() == target.resolve():
            continue
        if target.exists():
            cmp = filecmp.dircmp(d, target)
            if cmp.diff_files or cmp.left_only:
                raise ValueError(f"{target} already exists and differs from {d} "
                                 f"({', '.join((cmp.diff_files + cmp.left_only)[:5])})")
            continue
        shutil.copytree(d, target)
    run = read_run(out)
    infos = [read_json(d / "run.json") for d in sorted(out.glob("machine_*"))]
    machines = max((int(i.get("machines", 0)) for i in infos), default=0)
    present = sorted(int(i["machine_id"]) for i in infos if "machine_id" in i)
    summary = {
        "run_id": next(iter(runs), None),
        "run_dir": str(out),
        "machines": machines or len(present),
        "machines_missing": [m for m in range(machines) if m not in present],
        **summarize(run),
        "merged_from": [str(s) for s in sources],
    }
    write_json(out / "summary.json", summary)
    return summary
