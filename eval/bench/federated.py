#!/usr/bin/env python3
"""Federated and epidemic benchmark, every figure measured in this invocation.

Rows:

* ``broadcast``: a federated run (node ``federated``, FedAvg) with a server and 16
  clients, all sampled every round, every node's upload capped at 20 MB/s, and a 20 MB
  model (an MLP on digits with hidden widths [4800, 1024]: 5.2 M float32 parameters).
  Measured: the time from the server's `publish` of the global model until the last
  sampled client holds it (each client's ``broadcast_seconds`` record; the round's
  maximum over clients, median over rounds), with ``tcp`` (the server uploads 16 copies:
  about 16 s) and with ``torrent`` (the clients swarm). Target: torrent ≤ 1/4 of tcp.
* ``epidemic``: epidemic learning (EL-Local, s = 3) against D-PSGD on a 3-regular graph,
  16 nodes on digits with Dirichlet(0.1) label skew, evaluated every round: the first
  round at which the nodes' mean test accuracy reaches 90 %, and the bytes all nodes
  had sent by then.

Method: each run is a plain ``dflsplit run`` (the launcher in this process) of
eval/configs/federated.yaml or default.yaml with the overrides printed; nothing samples
the nodes while they run. Usage::

    python eval/bench/federated.py [--rows broadcast,epidemic] [--rounds 3] [--out FILE]

The table goes to eval/bench/results/federated.txt.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dflsplit.config import load_config  # noqa: E402
from dflsplit.launch import run_experiment  # noqa: E402
from dflsplit.mappings import free_base_port  # noqa: E402
from dflsplit.results import read_run  # noqa: E402

RATE = 20_000_000  # bytes/s, every node's upload cap in the broadcast row


def run(config: str, overrides: list[str], nodes: int, port: int) -> tuple[dict, dict]:
    base = free_base_port(nodes, port)
    cfg = load_config(ROOT / config, [*overrides, f"run.base_port={base}", "run.progress=false"])
    out = Path(tempfile.mkdtemp(prefix="bench-federated-"))
    return run_experiment(cfg, out, progress=False), read_run(out)


def broadcast(rounds: int, port: int, lines: list[str]) -> dict:
    overrides = [
        "run.procs_per_machine=17", f"run.rounds={rounds}", f"node.test_after={rounds}",
        "node.fraction=1.0", "model.name=mlp", "model.hidden=[4800, 1024]", "training.local_steps=1",
        f"communication.upload_limit={RATE}", "communication.timeout=300",
    ]
    lines.append(f"broadcast: eval/configs/federated.yaml with {' '.join(overrides)}")
    out = {}
    for name in ("tcp", "torrent"):
        summary, records = run("eval/configs/federated.yaml", [*overrides, f"communication.name={name}"], 17, port)
        per_round = [max(records[c][r]["broadcast_seconds"] for c in records if c != 0) for r in range(rounds)]
        out[name] = statistics.median(per_round)
        lines.append(f"  {name:8s} server publish → last of 16 clients holds the model: median "
                     f"{out[name]:.2f} s over {rounds} rounds (each: {', '.join(f'{t:.2f}' for t in per_round)}); "
                     f"server sent {records[0][-1]['bytes_sent'] / 1e6:.0f} MB")
        port += 200
    ratio = out["torrent"] / out["tcp"]
    lines.append(f"  torrent / tcp = {ratio:.2f} (target ≤ 0.25: {'met' if ratio <= 0.25 else 'NOT met'})")
    return out


def to_90(records: dict) -> tuple[int | None, int | None]:
    rounds = len(next(iter(records.values())))
    for r in range(rounds):
        accs = [rs[r]["test_acc"] for rs in records.values()]
        if all(a is not None for a in accs) and statistics.fmean(accs) >= 0.9:
            return r + 1, sum(rs[r]["bytes_sent"] for rs in records.values())
    return None, None


def epidemic(rounds: int, port: int, lines: list[str]) -> dict:
    common = ["run.procs_per_machine=16", f"run.rounds={rounds}", "node.test_after=1",
              "dataset.partition=dirichlet", "dataset.alpha=0.1", "communication.name=tcp"]
    runs = {
        "EL-Local s=3": [*common, "node.name=epidemic", "node.peers=3"],
        "D-PSGD 3-regular": [*common, "node.name=dpsgd", "graph.degree=3"],
    }
    lines.append(f"epidemic: eval/configs/default.yaml with {' '.join(common)}")
    out = {}
    for label, overrides in runs.items():
        summary, records = run("eval/configs/default.yaml", overrides, 16, port)
        r90, b90 = to_90(records)
        out[label] = (r90, b90, summary["test_acc_mean"])
        reach = f"90 % at round {r90}, {b90 / 1e6:.1f} MB sent by all nodes" if r90 else f"90 % not reached in {rounds} rounds"
        lines.append(f"  {label:18s} {reach}; final mean accuracy {summary['test_acc_mean']:.4f}")
        port += 200
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="broadcast,epidemic")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the broadcast row")
    ap.add_argument("--epidemic-rounds", type=int, default=60)
    ap.add_argument("--base-port", type=int, default=26000)
    ap.add_argument("--out", default=str(ROOT / "eval/bench/results/federated.txt"))
    args = ap.parse_args(argv)
    lines = [f"# eval/bench/federated.py, {datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, "
             f"{len(__import__('os').sched_getaffinity(0))} cores; all figures measured in this run"]
    rows = args.rows.split(",")
    if "broadcast" in rows:
        broadcast(args.rounds, args.base_port, lines)
    if "epidemic" in rows:
        epidemic(args.epidemic_rounds, args.base_port + 1000, lines)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
