#!/usr/bin/env python3
"""Soak: many nodes for many rounds, some killed (SIGKILL) and restarted (--resume) at random times.

A plain ``dflsplit run`` of eval/configs/default.yaml (``run.on_peer_failure: skip``,
``run.checkpoint_every: 1``, every model sent as a torrent so that spools exist) in a child
process at a lower priority (so that restarts come up while it runs); at random rounds a tenth of the nodes are
killed with SIGKILL and, a moment later, restarted with ``dflsplit run --resume --nodes U``,
which rejoins them into the run. Every few seconds the benchmark samples, for every live
node process, its resident memory (``/proc/PID/statm``: one small read, it does not walk
the page tables as ``smaps`` would) and its open file descriptors (``/proc/PID/fd``), and
the size of the data-plane spools (``/dev/shm/dflsplit-*``).

It reports memory per node over the run, and its growth after round 10 for the nodes never
killed (target: under 10 %), file descriptors, spool size, and what is left at the end:
spool folders and node processes (targets: none).

    python eval/bench/soak.py [--nodes 48] [--rounds 100] [--kill 0.1] [--seed 1] [--out FILE]

The table goes to eval/bench/results/soak.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dflsplit.communication.torrent_spool import default_spool_parent  # noqa: E402
from dflsplit.mappings import free_base_port  # noqa: E402
from dflsplit.results import read_json  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
SPOOL_PREFIX = "dflsplit-"


def rss(pid: int) -> int | None:
    """Resident bytes of a process (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def spools(parent: Path, pids: set[int]) -> list[Path]:
    """The dflsplit spool folders under `parent` of the processes `pids` (named after their pid)."""
    out = []
    for d in parent.glob(SPOOL_PREFIX + "*"):
        try:
            if int(d.name[len(SPOOL_PREFIX):].split("-", 1)[0]) in pids:
                out.append(d)
        except ValueError:
            continue
    return out


def spool_bytes(parent: Path, pids: set[int]) -> tuple[int, int]:
    """(bytes, folders) of the spools of the processes `pids` under `parent`."""
    total, found = 0, spools(parent, pids)
    for d in found:
        try:
            for p in d.rglob("*"):
                if p.is_file():
                    total += p.stat().st_size
        except OSError:  # removed while we looked
            continue
    return total, len(found)


def rounds_done(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


@dataclass
class Soak:
    """One soak run and what was sampled."""

    nodes: int
    rounds: int
    kill: float
    seed: int
    out: Path
    samples: list[dict] = field(default_factory=list)
    kills: list[tuple[int, int]] = field(default_factory=list)  # (round, uid)
    at_round_10: dict[int, int] = field(default_factory=dict)
    last_rss: dict[int, int] = field(default_factory=dict)
    leftover_processes: list[int] = field(default_factory=list)
    leftover_spools: int = 0
    wall: float = 0.0
    returncodes: list[int] = field(default_factory=list)

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "dflsplit.cli", "run", str(ROOT / "eval/configs/default.yaml"),
                "--out", str(self.out), "--no-progress",
                "--set", f"run.procs_per_machine={self.nodes}", "--set", f"run.rounds={self.rounds}",
                "--set", "node.test_after=10", "--set", "run.on_peer_failure=skip", "--set", "run.checkpoint_every=1",
                "--set", "communication.timeout=20", "--set", f"run.base_port={port}", "--set", "run.start_timeout=300",
                "--set", "communication.path=torrent"]  # every model a torrent: spools to leave behind

    def run(self, say=print) -> "Soak":
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        rng = random.Random(self.seed)
        victims = rng.sample(range(self.nodes), max(1, round(self.kill * self.nodes)))
        plan = sorted((rng.randint(10, max(11, self.rounds - 25)), u) for u in victims)
        mdir = self.out / "machine_0"
        cmd = self.command(free_base_port(self.nodes + 1, 15000))
        t0 = time.monotonic()
        # the run at a low priority, so that a restarted node starts while the run goes on
        main = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: os.nice(10))
        restarts: list[subprocess.Popen] = []
        spool_parent = default_spool_parent(None)
        pending = list(plan)
        killed_pids: set[int] = set()
        last_sample = 0.0
        while main.poll() is None:
            time.sleep(0.2)
            pids = {int(u): p for u, p in read_json(mdir / "pids.json").items()} if (mdir / "pids.json").exists() else {}
            progress = {u: rounds_done(mdir / f"node_{u}.jsonl") for u in range(self.nodes)}
            while pending and pids and min(progress.values()) >= pending[0][0]:
                r, u = pending.pop(0)
                if u in pids and rss(pids[u]) is not None:
                    os.kill(pids[u], signal.SIGKILL)
                    killed_pids.add(pids[u])
                    self.kills.append((progress[u], u))
                    say(f"round {progress[u]}: killed node {u} (pid {pids[u]}); restarting it")
                    time.sleep(1.0)
                    restarts.append(subprocess.Popen(cmd + ["--resume", "--nodes", str(u)], env=env,
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
            now = time.monotonic()
            if now - last_sample >= 2.0 and pids:
                last_sample = now
                live = {u: p for u, p in pids.items() if p not in killed_pids}
                mem = {u: rss(p) for u, p in live.items()}
                # gone, exited and not yet reaped (0), or past its last round (tearing down)
                mem = {u: m for u, m in mem.items() if m and progress[u] < self.rounds}
                files = [n for n in (fds(p) for p in live.values()) if n is not None]
                spool, folders = spool_bytes(spool_parent, set(pids.values()) | killed_pids)
                never_killed = {u for u in mem if u not in {v for _, v in self.kills}}
                for u in never_killed:
                    if progress[u] >= 10 and u not in self.at_round_10:
                        self.at_round_10[u] = mem[u]
                    self.last_rss[u] = mem[u]
                self.samples.append({
                    "seconds": round(now - t0, 1), "min_round": min(progress.values()),
                    "nodes": len(mem), "rss_median_mb": statistics.median(mem.values()) / 2**20 if mem else 0,
                    "rss_max_mb": max(mem.values()) / 2**20 if mem else 0,
                    "fds_max": max(files) if files else 0, "spool_mb": spool / 2**20, "spool_folders": folders,
                })
        self.returncodes = [main.returncode] + [p.wait(timeout=600) for p in restarts]
        self.wall = time.monotonic() - t0
        time.sleep(1.0)
        import psutil

        every = set(read_json(mdir / "pids.json").values()) | killed_pids
        self.leftover_spools = len(spools(spool_parent, every))
        self.leftover_processes = [p for p in every if psutil.pid_exists(p) and
                                   psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        return self

    def growth(self) -> list[float]:
        """Memory growth after round 10 of every node never killed (end / round 10 − 1)."""
        killed = {u for _, u in self.kills}
        return [self.last_rss[u] / self.at_round_10[u] - 1 for u in self.at_round_10
                if u in self.last_rss and u not in killed]

    def report(self) -> list[str]:
        g = self.growth()
        lines = [
            f"# Soak, {datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, {os.cpu_count()} cores",
            f"{self.nodes} nodes x {self.rounds} rounds (eval/configs/default.yaml, on_peer_failure: skip, "
            f"checkpoint_every: 1); {len(self.kills)} killed (SIGKILL) and restarted with --resume --nodes: "
            + ", ".join(f"node {u} at round {r}" for r, u in self.kills),
            f"wall {self.wall:.0f} s; exit codes {self.returncodes}",
            "method: /proc/PID/statm (resident memory) and /proc/PID/fd of every live node every 2 s; "
            "spool = bytes in the spools of the run's processes (/dev/shm/dflsplit-<pid>-*)",
            "",
            f"{'s':>6} {'min round':>9} {'nodes':>5} {'RSS median MB':>13} {'RSS max MB':>10} {'fds max':>7} "
            f"{'spool MB':>8} {'spools':>6}",
        ]
        step = max(1, len(self.samples) // 25)
        for s in self.samples[::step] + self.samples[-1:]:
            lines.append(f"{s['seconds']:>6} {s['min_round']:>9} {s['nodes']:>5} {s['rss_median_mb']:>13.1f} "
                         f"{s['rss_max_mb']:>10.1f} {s['fds_max']:>7} {s['spool_mb']:>8.2f} {s['spool_folders']:>6}")
        lines += [
            "",
            f"memory growth after round 10 (nodes never killed, {len(g)}): median {100 * statistics.median(g):.1f} %, "
            f"max {100 * max(g):.1f} % (target < 10 %)" if g else "memory growth: no node sampled at round 10",
            f"left at the end: {self.leftover_spools} spool folder(s), {len(self.leftover_processes)} node process(es) "
            f"(target: none)",
        ]
        return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=48)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--kill", type=float, default=0.1, help="fraction of the nodes killed and restarted")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "eval/bench/results/soak.txt"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        soak = Soak(args.nodes, args.rounds, args.kill, args.seed, Path(tmp) / "run").run()
    lines = soak.report()
    print("\n".join(lines))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(json.dumps({"growth_max": max(soak.growth(), default=None), "leftover_spools": soak.leftover_spools,
                      "leftover_processes": len(soak.leftover_processes)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
