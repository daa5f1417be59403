#!/usr/bin/env python3
"""D-PSGD benchmark: start-up, round times, wall time and memory of a whole run.

Launches ``dflsplit run`` as a child process and samples the proportional set size (PSS,
so shared libraries are not counted once per process) of every node process while it
runs. Presets:

* ``default``: the README's default experiment (eval/configs/default.yaml).
* ``decentralizepy``: decentralizepy's tutorial workload: 16 nodes on a 3-regular graph,
  LeNet on 32×32×3 ten-class data (5,000 train / 1,000 test, synthetic), batch 8, 3 local
  SGD steps per round, 40 rounds, every node evaluating on the global test set every 10.

Usage::

    python eval/bench/dpsgd_round.py --preset decentralizepy [--nodes 64] [--transport tcp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]

PRESETS = {
    "default": (ROOT / "eval/configs/default.yaml", []),
    "decentralizepy": (
        ROOT / "eval/configs/default.yaml",
        [
            "run.name=decentralizepy-tutorial", "run.rounds=40", "run.procs_per_machine=16",
            "dataset.name=synthetic", "dataset.image_shape=[3, 32, 32]", "dataset.num_classes=10",
            "dataset.num_train=5000", "dataset.num_test=1000", "dataset.partition=iid", "dataset.test=global",
            "model.name=lenet", "training.batch_size=8", "training.local_steps=3",
            "optimizer.lr=0.01", "optimizer.momentum=0.0", "node.test_after=10",
            "graph.type=regular", "graph.degree=3",
        ],
    ),
}

# decentralizepy on the same workload, measured on this machine kind (issue #2).
DECENTRALIZEPY = {
    "wall_seconds": 71.0, "startup_seconds": 17.0, "median_round_seconds": 0.30,
    "median_eval_round_seconds": 10.0, "total_pss_gb": 7.0, "peak_node_pss_gb": 0.9,
}
TARGETS = {"wall_seconds": 30.0, "startup_seconds": 6.0, "total_pss_gb": 3.5}


def sample_pss(root: psutil.Process) -> dict[int, int]:
    """PSS in bytes of every descendant process of `root` (the node processes)."""
    out = {}
    for p in root.children(recursive=True):
        try:
            out[p.pid] = p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def run(preset: str, nodes: int | None, transport: str | None, extra: list[str], base_port: int) -> dict:
    config, overrides = PRESETS[preset]
    overrides = [*overrides, f"run.base_port={base_port}", "run.progress=false"]
    if nodes:
        overrides.append(f"run.procs_per_machine={nodes}")
    if transport:
        overrides.append(f"communication.name={transport}")
    overrides += extra
    out = Path(tempfile.mkdtemp(prefix=f"bench-{preset}-"))
    cmd = [sys.executable, "-m", "dflsplit.cli", "run", str(config), "--out", str(out), "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    root = psutil.Process(proc.pid)
    peak_total, peak_node = 0, 0
    while proc.poll() is None:
        pss = sample_pss(root)
        if pss:
            peak_total = max(peak_total, sum(pss.values()))
            peak_node = max(peak_node, max(pss.values()))
        time.sleep(0.25)
    if proc.returncode != 0:
        raise SystemExit(f"dflsplit run failed with exit code {proc.returncode} (see {out})")
    summary = json.loads((out / "summary.json").read_text())
    # Count from the command's own start (interpreter and imports included), not the launcher's.
    if summary["startup_seconds"] is not None:
        summary["startup_seconds"] += summary["launch_time"] - t0
    summary["wall_seconds"] = time.time() - t0
    # The launcher's own PSS counts too: it holds the shared pages the nodes map.
    summary["total_pss_gb"] = peak_total / 1e9
    summary["peak_node_pss_gb"] = peak_node / 1e9
    return summary


def report(preset: str, s: dict) -> None:
    rows = [
        ("total wall time (s)", "wall_seconds", s["wall_seconds"]),
        ("start-up: launch to first round (s)", "startup_seconds", s["startup_seconds"]),
        ("median round, no evaluation (s)", "median_round_seconds", s["median_round_seconds"]),
        ("median round, with evaluation (s)", "median_eval_round_seconds", s["median_eval_round_seconds"]),
        ("memory, all nodes, peak PSS (GB)", "total_pss_gb", s["total_pss_gb"]),
        ("memory, one node, peak PSS (GB)", "peak_node_pss_gb", s["peak_node_pss_gb"]),
    ]
    base = DECENTRALIZEPY if preset == "decentralizepy" and s["nodes"] == 16 else {}
    print(f"\npreset {preset}: {s['nodes']} nodes, {s['rounds']} rounds, transport {s['transport']}, "
          f"mean test accuracy {s['test_acc_mean']:.4f} ± {s['test_acc_std']:.4f}")
    print(f"{'metric':40s} {'dflsplit':>10s} {'decentralizepy':>15s} {'target':>8s}")
    for label, key, value in rows:
        ref = f"{base[key]:.2f}" if key in base else "-"
        tgt = f"≤{TARGETS[key]:g}" if key in TARGETS and base else "-"
        val = "-" if value is None else f"{value:.3f}"
        print(f"{label:40s} {val:>10s} {ref:>15s} {tgt:>8s}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="decentralizepy")
    ap.add_argument("--nodes", type=int, help="number of nodes (default: the preset's)")
    ap.add_argument("--transport", choices=["tcp", "torrent"], help="default: the config's")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--base-port", type=int, default=int(os.environ.get("DFLSPLIT_BENCH_PORT", "27000")))
    ap.add_argument("--json", help="also write the summary (with memory figures) to this file")
    args = ap.parse_args(argv)
    summary = run(args.preset, args.nodes, args.transport, args.extra, args.base_port)
    report(args.preset, summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
