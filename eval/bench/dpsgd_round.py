#!/usr/bin/env python3
"""D-PSGD benchmark: a whole run against a plain run of the same preset and the arithmetic floor.

Presets:

* ``decentralizepy``: decentralizepy's tutorial workload: 16 nodes on a 3-regular graph,
  LeNet on a CIFAR-10 in torchvision's on-disk layout (5,000 training and 1,000 test
  images, written by this benchmark: class-conditional 32×32×3 images in the real
  ``cifar-10-batches-py`` pickle format, read by dflsplit's CIFAR-10 loader), batch 8,
  3 local SGD steps per round, 40 rounds, every node evaluating on the global test set
  every 10.
* ``default``: the README's default experiment (eval/configs/default.yaml).

What one invocation measures, in this order:

1. **plain**: ``dflsplit run`` of the preset as a user types it (a child process), timed
   from its start to its exit; nothing else runs.
2. **measured**: the same command again, started inside a memory cgroup of its own
   (cgroup v1 ``memory`` or v2, when writable: its peak usage is read once at the end, at
   no cost to the run); without cgroups, ``MemAvailable`` of ``/proc/meminfo`` sampled every
   0.5 s (one small read of a kernel counter; it does not walk any process's page tables).
   The run's own summary gives start-up, median round times and accuracy.
3. **floor**: the same training and evaluation arithmetic (same model, batch shapes, number
   of steps and evaluations), as bare torch loops in one process per core (one torch
   thread each), with no framework around it: wall time of the compute, processes already
   started.

It prints wall / floor (the framework's overhead) and, for the decentralizepy preset,
decentralizepy's figures as **recorded** on this machine kind (issue #12, measured
2026-11; they are not measured here).

    python eval/bench/dpsgd_round.py --preset decentralizepy [--nodes N] [--nodes-per-process K]
        [--rounds R] [--train-images N] [--test-images N] [--eval-every R] [--transport tcp]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dflsplit.mappings import free_base_port  # noqa: E402

#: decentralizepy on the decentralizepy preset, recorded on this machine kind (issue #12, 2026-11)
RECORDED = {"source": "decentralizepy, recorded on this machine kind (issue #12, 2026-11), not measured here",
            "wall_seconds": "71-104", "memory_gb": "7"}
TARGET_WALL_OVER_FLOOR = 1.3


def write_cifar10(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """A CIFAR-10 in torchvision's on-disk layout: `train` training images in five batches
    and `test` test images, class-conditional (a fixed template per class plus noise)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, 3072)).astype(np.float32)

    def images(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.integers(0, 10, size=n)
        data = templates[labels] + rng.normal(0, 60, size=(n, 3072))
        return np.clip(data, 0, 255).astype(np.uint8), [int(x) for x in labels]

    sizes = [train // 5 + (1 if i < train % 5 else 0) for i in range(5)]
    for i, n in enumerate(sizes, 1):
        data, labels = images(n)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": data}, f, 2)
    data, labels = images(test)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data}, f, 2)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": max(sizes), b"num_vis": 3072}, f, 2)
    return root


def preset_overrides(args, data_root: Path | None) -> list[str]:
    if args.preset == "default":
        out = []
        if args.nodes:
            out.append(f"run.procs_per_machine={args.nodes}")
    else:
        out = [
            "run.name=decentralizepy-tutorial", f"run.rounds={args.rounds}", f"run.procs_per_machine={args.nodes}",
            "dataset.name=cifar10", f"dataset.root={data_root}", "dataset.partition=iid", "dataset.test=global",
            "model.name=lenet", "training.batch_size=8", "training.local_steps=3",
            "optimizer.lr=0.01", "optimizer.momentum=0.0", f"node.test_after={args.eval_every}",
            "graph.type=regular", "graph.degree=3",
        ]
    out += [f"run.nodes_per_process={args.nodes_per_process}", "run.progress=false"]
    if args.transport:
        out.append(f"communication.name={args.transport}")
    return out + args.extra


def command(overrides: list[str], out: Path, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "dflsplit.cli", "run", str(ROOT / "eval/configs/default.yaml"), "--out", str(out),
           "--no-progress"]
    for o in [*overrides, f"run.base_port={port}"]:
        cmd += ["--set", o]
    return cmd


# --- memory ----------------------------------------------------------------------------------
class MemoryGroup:
    """A memory cgroup the measured run starts in (v1 or v2; None when not writable)."""

    def __init__(self):
        self.path: Path | None = None
        self.kind = ""
        name = f"dflsplit-bench-{os.getpid()}"
        for base, kind in ((Path("/sys/fs/cgroup/memory"), "v1"), (Path("/sys/fs/cgroup/unified"), "v2"),
                           (Path("/sys/fs/cgroup"), "v2")):
            try:
                if kind == "v2" and not (base / "cgroup.controllers").exists():
                    continue
                path = base / name
                path.mkdir()
                self.path, self.kind = path, kind
                break
            except OSError:
                continue

    def enter(self) -> None:
        """In the child, before exec: join the group (everything it forks stays in it)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        if self.path is None:
            return None
        name = "memory.max_usage_in_bytes" if self.kind == "v1" else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def cache(self) -> int | None:
        """Page cache still charged to the group (files the run wrote or read first, e.g. the
        dataset's converted cache): part of the peak, not memory the nodes hold."""
        if self.path is None:
            return None
        try:
            stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
            return int(stat.get("total_cache", stat.get("file", 0)))
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass

    @property
    def method(self) -> str:
        name = "memory.max_usage_in_bytes" if self.kind == "v1" else "memory.peak"
        return f"peak of the run's own memory cgroup ({self.kind} {name}, read once at the end)"


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# --- the runs -----------------------------------------------------------------------------
def plain_run(cmd: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"plain run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall


def measured_run(cmd: list[str], out: Path) -> dict:
    group = MemoryGroup()
    t0 = time.perf_counter()
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=group.enter if group.path else None)
    low, base = [mem_available()], mem_available()
    if group.path is None:  # sample the system's available memory (cheap: one kernel counter)
        def watch():
            while proc.poll() is None:
                low[0] = min(low[0], mem_available())
                time.sleep(0.5)
        threading.Thread(target=watch, daemon=True).start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    peak, cache = group.peak(), group.cache()
    if group.path is not None and group.kind == "v1":
        try:
            (group.path / "memory.force_empty").write_text("0")  # let the group go
        except OSError:
            pass
    group.remove()
    if proc.returncode:
        raise SystemExit(f"measured run failed ({proc.returncode}): {err[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = wall
    summary["startup_seconds"] = (summary["startup_seconds"] + summary["launch_time"] - start
                                  if summary["startup_seconds"] is not None else None)
    if peak is not None:
        summary["memory_bytes"], summary["memory_method"] = peak, group.method
        summary["memory_cache_bytes"] = cache
    else:
        summary["memory_bytes"] = base - low[0]
        summary["memory_method"] = "drop of /proc/meminfo MemAvailable during the run, sampled every 0.5 s"
    return summary


# --- the floor -------------------------------------------------------------------------------
FLOOR_SCRIPT = r"""
import sys, time
t_start = time.perf_counter()
import torch
from torch import nn
nodes, rounds, steps, batch, evals, test_images, eval_batch = map(int, sys.argv[1:8])
eval_rounds = set(map(int, sys.argv[8].split(","))) if sys.argv[8] else set()
torch.set_num_threads(1)


class LeNet(nn.Module):  # the same network as dflsplit's lenet, written out: no framework here
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.GroupNorm(2, 32), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 32, 5, padding=2), nn.GroupNorm(2, 32), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 5, padding=2), nn.GroupNorm(2, 64), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


torch.manual_seed(0)
layout = torch.channels_last
models = [LeNet().to(memory_format=layout) for _ in range(nodes)]
opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]
g = torch.Generator().manual_seed(0)
shard = torch.randn(64, 3, 32, 32, generator=g).contiguous(memory_format=layout)
labels = torch.randint(0, 10, (64,), generator=g)
test_x = torch.randn(test_images, 3, 32, 32, generator=g).contiguous(memory_format=layout)
test_y = torch.randint(0, 10, (test_images,), generator=g)
loss_fn = nn.CrossEntropyLoss()
t0 = time.perf_counter()
for r in range(rounds):
    for m, opt in zip(models, opts):
        m.train()
        for _ in range(steps):
            idx = torch.randint(0, 64, (batch,), generator=g)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(m(shard[idx]), labels[idx])
            loss.backward()
            opt.step()
            loss.item()
    if r in eval_rounds:
        for m in models:
            m.eval()
            with torch.inference_mode():
                for i in range(0, test_images, eval_batch):
                    out = m(test_x[i:i + eval_batch])
                    nn.functional.cross_entropy(out, test_y[i:i + eval_batch], reduction="sum").item()
                    (out.argmax(1) == test_y[i:i + eval_batch]).sum().item()
print(time.perf_counter() - t0, t0 - t_start)
"""


def check_floor_model() -> None:
    """The floor's LeNet must be dflsplit's lenet (the same arithmetic): same parameter shapes."""
    import torch  # noqa: F401

    from dflsplit.config import load_config
    from dflsplit.models import build_model

    ours = build_model(load_config(None, ["model.name=lenet"]).model, (3, 32, 32), 10, seed=1)
    scope: dict = {}
    exec(FLOOR_SCRIPT.split("torch.manual_seed(0)")[0].replace("nodes, rounds", "_ = 0 #").replace(
        "eval_rounds = ", "_ = 0 #"), scope)
    bare = scope["LeNet"]()
    shapes = lambda m: sorted(tuple(p.shape) for p in m.parameters())  # noqa: E731
    if shapes(ours) != shapes(bare):
        raise SystemExit(f"the floor's LeNet differs from dflsplit's: {shapes(bare)} != {shapes(ours)}")


def floor(nodes: int, rounds: int, eval_every: int, test_images: int, cores: int) -> tuple[float, float]:
    """(wall of `cores` fresh Python processes running their share of the arithmetic, from
    their start to the last exit: interpreter and `import torch` included; the longest
    compute alone)."""
    check_floor_model()
    evals = ",".join(str(r) for r in range(rounds) if (r + 1) % eval_every == 0 or r == rounds - 1)
    shares = [nodes // cores + (1 if i < nodes % cores else 0) for i in range(cores)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", FLOOR_SCRIPT, str(n), str(rounds), "3", "8", "0",
                               str(test_images), "64", evals], stdout=subprocess.PIPE, text=True)
             for n in shares if n]
    outs = [p.communicate()[0].split() for p in procs]
    wall = time.perf_counter() - t0
    return wall, max(float(o[0]) for o in outs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["decentralizepy", "default"], default="decentralizepy")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--nodes-per-process", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--train-images", type=int, default=5000)
    ap.add_argument("--test-images", type=int, default=1000)
    ap.add_argument("--transport", choices=["tcp", "torrent"])
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--skip-plain", action="store_true", help="no plain run (the agreement check is skipped)")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-dpsgd-") as tmp:
        tmp = Path(tmp)
        data = write_cifar10(tmp / "data", args.train_images, args.test_images) if args.preset != "default" else None
        overrides = preset_overrides(args, data)
        nodes = args.nodes
        port = free_base_port(nodes + 1, 15000)
        plain = None if args.skip_plain else plain_run(command(overrides, tmp / "plain", port), tmp / "plain")
        s = measured_run(command(overrides, tmp / "measured", port), tmp / "measured")
        fl = compute = None
        if not args.skip_floor and args.preset == "decentralizepy":
            fl, compute = floor(nodes, args.rounds, args.eval_every, args.test_images, cores)
    rows = [
        ("wall time, plain `dflsplit run` (s)", plain),
        ("wall time, measured run (s)", s["wall_seconds"]),
        ("start-up: command start to first round (s)", s["startup_seconds"]),
        ("median round, no evaluation (s)", s["median_round_seconds"]),
        ("median round, with evaluation (s)", s["median_eval_round_seconds"]),
        ("memory, whole run, peak (GB)", s["memory_bytes"] / 1e9),
        ("memory per node (MB)", s["memory_bytes"] / 1e6 / nodes),
        ("  of the peak, page cache still charged at the end (GB)",
         s["memory_cache_bytes"] / 1e9 if s.get("memory_cache_bytes") is not None else None),
        ("mean test accuracy", s["test_acc_mean"]),
        ("floor: bare torch scripts, start to exit (s)", fl),
        ("  of which the arithmetic alone (s)", compute),
        ("wall / floor", s["wall_seconds"] / fl if fl else None),
    ]
    lines = [
        f"# dpsgd_round, preset {args.preset}: {nodes} nodes ({args.nodes_per_process} per process), "
        f"{args.rounds} rounds, transport {s['transport']}; {platform.node()}, {cores} cores",
        f"memory: {s['memory_method']}",
        "floor: the same training steps and evaluations (LeNet, batch 8, 3 steps per round; test batches of "
        f"64) as bare torch loops in {cores} fresh Python processes of one torch thread each (one per core), "
        "from their start to the last exit: the interpreter and `import torch` included, no framework",
        "",
    ]
    for label, value in rows:
        lines.append(f"{label:48s} {'-' if value is None else f'{value:.3f}'}")
    if plain:
        lines.append(f"measured / plain wall time: {s['wall_seconds'] / plain:.3f} (agreement within 10 %: "
                     f"{'yes' if abs(s['wall_seconds'] / plain - 1) <= 0.10 else 'no'})")
    if fl:
        ratio = s["wall_seconds"] / fl
        lines.append(f"wall / floor {ratio:.2f} (target <= {TARGET_WALL_OVER_FLOOR}: "
                     f"{'met' if ratio <= TARGET_WALL_OVER_FLOOR else 'not met'})")
    if args.preset == "decentralizepy" and nodes == 16:
        lines.append(f"{RECORDED['source']}: wall {RECORDED['wall_seconds']} s, memory {RECORDED['memory_gb']} GB")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
