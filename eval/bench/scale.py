#!/usr/bin/env python3
"""Scale: the decentralizepy preset with many nodes on one machine, memory and wall time.

For each node count (default 16, 128, 1024): a plain ``dflsplit run`` of the
decentralizepy preset (LeNet on a CIFAR-10 in torchvision's layout, batch 8, 3 local steps,
3-regular graph) with 50,000 training images (so that each of 1,024 nodes holds a shard),
10 rounds and one evaluation at the end, ``run.nodes_per_process`` nodes per OS process.
Memory: the peak of the run's own memory cgroup, read once at the end (see
``dpsgd_round.py``), divided by the node count; the page cache still charged to the group
at the end (the dataset's converted cache) is printed apart. Wall: from the command's start
to its exit.

    python eval/bench/scale.py [--nodes 16,128,1024] [--nodes-per-process 64] [--out FILE]

Target: at most 20 MB per node at 1,024 nodes. The table goes to eval/bench/results/scale.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dpsgd_round import ROOT, command, measured_run, preset_overrides, write_cifar10  # noqa: E402

from dflsplit.mappings import free_base_port  # noqa: E402

TARGET_MB_PER_NODE = 20.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="16,128,1024")
    ap.add_argument("--nodes-per-process", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--train-images", type=int, default=50000)
    ap.add_argument("--test-images", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "eval/bench/results/scale.txt"))
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.nodes.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    lines = [
        f"# Scale, {datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, {cores} cores",
        f"decentralizepy preset: LeNet, CIFAR-10 layout ({args.train_images} training / {args.test_images} test "
        f"images), batch 8, 3 local steps, 3-regular graph, {args.rounds} rounds, one evaluation at the end; "
        f"up to {args.nodes_per_process} nodes per process",
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        data = write_cifar10(tmp / "data", args.train_images, args.test_images)
        for n in counts:
            ns = argparse.Namespace(preset="decentralizepy", nodes=n, rounds=args.rounds, eval_every=args.rounds,
                                    nodes_per_process=min(args.nodes_per_process, n), transport=None, extra=[
                                        "communication.timeout=3600", "run.start_timeout=3600"])
            out = tmp / f"run{n}"
            s = measured_run(command(preset_overrides(ns, data), out, free_base_port(n + 1, 15000)), out)
            rows.append((n, s))
            print(f"{n} nodes: wall {s['wall_seconds']:.0f} s, peak {s['memory_bytes'] / 1e9:.2f} GB", flush=True)
        method = rows[0][1]["memory_method"]
    lines += [f"memory: {method}; the page cache of the dataset's converted files is part of it (column cache)", ""]
    lines.append(f"{'nodes':>6} {'per process':>11} {'wall s':>8} {'start-up s':>10} {'round s':>8} "
                 f"{'peak GB':>8} {'cache GB':>8} {'MB per node':>11} {'accuracy':>8}")
    for n, s in rows:
        cache = s.get("memory_cache_bytes")
        lines.append(f"{n:>6} {min(args.nodes_per_process, n):>11} {s['wall_seconds']:>8.0f} "
                     f"{s['startup_seconds'] or 0:>10.1f} {s['median_round_seconds'] or 0:>8.2f} "
                     f"{s['memory_bytes'] / 1e9:>8.2f} {(cache or 0) / 1e9:>8.2f} "
                     f"{s['memory_bytes'] / 1e6 / n:>11.1f} {s['test_acc_mean']:>8.3f}")
    big = [s for n, s in rows if n == max(counts)]
    if big:
        per = big[0]["memory_bytes"] / 1e6 / max(counts)
        lines.append(f"\nat {max(counts)} nodes: {per:.1f} MB per node (target <= {TARGET_MB_PER_NODE:g}: "
                     f"{'met' if per <= TARGET_MB_PER_NODE else 'not met'})")
    print("\n".join(lines))
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
