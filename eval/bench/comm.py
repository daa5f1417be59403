#!/usr/bin/env python3
"""Communication benchmark: the `torrent` transport beside `tcp`, measured in the same run.

Every node is its own process (forked from this one, which runs no torch operation), all
on loopback. Rows (each printed with the `tcp` figure beside the `torrent` one):

* ``p2p``: one publisher, one receiver, 1 MB tensor: median latency from `publish` to
  `receive` returning (target: torrent ≤ 50 ms);
* ``throughput``: the same with 100 MB (target: torrent ≥ 30 % of tcp's MB/s);
* ``swarm``: one publisher to 8 receivers, 20 MB, every node's upload capped at 20 MB/s:
  time until the last receiver has the tensors (target: torrent ≤ 1/4 of tcp's time);
* ``dpsgd``: the default 16-node D-PSGD experiment (eval/configs/default.yaml): median
  round time (target: torrent ≤ 1.5 × tcp's); also with every model sent as a torrent;
* ``sweep``: latency by payload size, point to point unlimited and one to four with
  100 Mbit/s (12.5 MB/s) upload caps, with every payload sent as a torrent;
* ``paths``: every payload size (64 KiB to 64 MiB) × receivers (1, 4, 16) × upload cap
  (none, 10 MB/s), sent inline and as a torrent, beside the path ``communication.path:
  auto`` chooses (`dflsplit.communication.paths`): it must be within 10 % of the faster, or
  faster. ``--calibrate`` fits the model's constants to these measurements.

The torrent rows force the data plane (``path: torrent``) except ``dpsgd``, which
runs the defaults. Usage::

    python eval/bench/comm.py [--rows p2p,throughput,swarm,dpsgd,sweep] [--quick] [--out FILE]

Results go to eval/bench/results/comm.json (and the table to comm.txt beside it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dflsplit.communication import build_transport  # noqa: E402
from dflsplit.communication.control import ZmqTransport  # noqa: E402
from dflsplit.config import load_config, section_from_dict  # noqa: E402
from dflsplit.mappings import LinearMapping, free_base_port  # noqa: E402

MB = 1 << 20
FORCE_TORRENT = {"path": "torrent"}


def _node(uid, n, base, cfg_kw, size, receivers, reps, results):
    """One node of a publish/receive scenario (in its own process)."""
    import torch

    torch.set_num_threads(1)
    mapping = LinearMapping(1, n, {0: "127.0.0.1"}, base)
    cfg = section_from_dict("communication", **{"timeout": 120.0, "hello_timeout": 60.0, **cfg_kw})
    t = build_transport(uid, mapping, cfg)
    t.start()
    try:
        t.connect([u for u in range(n) if u != uid])
        x = torch.randn(size // 4) if uid == 0 else None
        for rep in range(reps):
            t.advance(rep)
            key = f"bench/{rep}"
            if uid == 0:
                t.publish(key, {"w": x}, to=receivers, header={"t0": time.perf_counter()})
                for r in receivers:  # acknowledgements keep the repetitions apart
                    t.receive(f"ack/{rep}", r)
            elif uid in receivers:
                m = t.receive(key, 0)
                results.put((uid, rep, time.perf_counter() - m.header["t0"]))  # one clock: CLOCK_MONOTONIC
                ZmqTransport.publish(t, f"ack/{rep}", {}, to=[0])  # inline on the control plane
    except Exception as e:  # reported to the parent, which fails the row
        results.put((uid, -1, f"{type(e).__name__}: {e}"))
        raise
    finally:
        t.close(timeout=10)


def scenario(name: str, receivers: int, size: int, reps: int, base: int, **cfg_kw) -> list[float]:
    """Per repetition (the first dropped as warm-up), the time until the last receiver had it."""
    n = receivers + 1
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    cfg_kw = {"name": name, **cfg_kw}
    procs = [
        ctx.Process(target=_node, args=(u, n, base, cfg_kw, size, list(range(1, n)), reps, results), daemon=True)
        for u in range(n)
    ]
    for p in procs:
        p.start()
    per_rep: dict[int, list[float]] = {}
    try:
        for _ in range(receivers * reps):
            uid, rep, value = results.get(timeout=600)
            if rep < 0:
                raise RuntimeError(f"{name}: node {uid} failed: {value}")
            per_rep.setdefault(rep, []).append(value)
    except queue.Empty:
        raise RuntimeError(f"{name}: no result within 600 s") from None
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    return [max(per_rep[r]) for r in sorted(per_rep) if r > 0]


def dpsgd(name: str, base: int, extra: list[str]) -> dict:
    from dflsplit.launch import run_experiment

    cfg = load_config(
        ROOT / "eval/configs/default.yaml",
        overrides=[f"communication.name={name}", f"run.base_port={base}", "run.progress=false", *extra],
    )
    out = Path(tempfile.mkdtemp(prefix=f"dflsplit-bench-comm-{name}-"))
    try:
        return run_experiment(cfg, out_dir=out, progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)


PATH_SIZES = [64 << 10, 256 << 10, MB, 4 * MB, 16 * MB, 64 * MB]
PATH_RECEIVERS = [1, 4, 16]
PATH_CAPS = [0, 10_000_000]


def paths_rows(table: "Table", base, quick: bool) -> list[dict]:
    """Every payload size × receivers × upload cap, sent inline and as a torrent (forced),
    and the path `communication.path: auto` takes for it (the model's choice, which the
    transport follows): auto must be within 10 % of the faster, or faster."""
    from dflsplit.communication.paths import CALIBRATION, DEFAULT_MODEL

    table.say(f"# paths: model {DEFAULT_MODEL} ({CALIBRATION})")
    measured = []
    for cap in PATH_CAPS:
        for k in PATH_RECEIVERS:
            for size in PATH_SIZES:
                if quick and size > 4 * MB:
                    continue
                reps = 2 if k * size / (cap or 1e9) > 5 else (3 if size >= 4 * MB else 5)
                kw = {"upload_limit": cap} if cap else {}
                t_in = statistics.median(scenario("torrent", k, size, reps, base(k + 1), path="inline", **kw))
                t_to = statistics.median(scenario("torrent", k, size, reps, base(k + 1), path="torrent", **kw))
                choice = DEFAULT_MODEL.choose(size, k, cap)
                auto = t_in if choice == "inline" else t_to
                best = min(t_in, t_to)
                label = f"paths: 1 -> {k}, {size >> 10} KiB, {'uploads %g MB/s' % (cap / 1e6) if cap else 'unlimited'}"
                table.add(label, "ms", 1000 * t_in, 1000 * t_to, auto / best, "auto <= 1.10 x the faster",
                          auto <= 1.10 * best, note=f"(auto: {choice})")
                measured.append({"size": size, "receivers": k, "cap": cap, "inline": t_in, "torrent": t_to})
    return measured


def fit_path_model(measured: list[dict]):
    """Least-squares fit of the path model's constants to forced inline and torrent times."""
    import numpy as np
    from scipy.optimize import least_squares

    from dflsplit.communication.paths import PathModel

    names = ["inline_latency", "torrent_fixed", "torrent_per_receiver", "hash_rate", "swarm_overhead",
             "direct_rate", "machine_rate"]
    x0 = np.log([0.002, 0.06, 0.004, 400e6, 1.25, 200e6, 600e6])

    def residuals(x):
        m = PathModel(**dict(zip(names, np.exp(x))))
        out = []
        for r in measured:
            up = r["cap"] or m.direct_rate
            out.append(np.log(m.inline_seconds(r["size"], r["receivers"], up, m.direct_rate) / r["inline"]))
            if r["receivers"] > 1:
                tu = r["cap"] or m.machine_rate
                out.append(np.log(m.torrent_seconds(r["size"], r["receivers"], tu, m.direct_rate, True) / r["torrent"]))
        return out

    fit = least_squares(residuals, x0)
    return PathModel(**dict(zip(names, np.exp(fit.x))))


class Table:
    def __init__(self):
        self.rows: list[dict] = []
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def add(self, row: str, unit: str, tcp, torrent, ratio=None, target: str = "", ok=None, note: str = ""):
        r = {"row": row, "unit": unit, "tcp": tcp, "torrent": torrent, "ratio": ratio, "target": target,
             "ok": ok, "note": note}
        self.rows.append(r)
        self.say(self.format(r))

    @staticmethod
    def header() -> str:
        return f"{'row':44s} {'unit':6s} {'tcp':>9s} {'torrent':>9s} {'ratio':>7s}  target"

    @staticmethod
    def format(r) -> str:
        def f(v):
            return f"{v:9.3f}" if isinstance(v, float) else f"{str(v):>9s}"

        ratio = f"{r['ratio']:7.3f}" if isinstance(r["ratio"], float) else f"{'':7s}"
        verdict = "" if r["ok"] is None else (" ok" if r["ok"] else " MISSED")
        return f"{r['row']:44s} {r['unit']:6s} {f(r['tcp'])} {f(r['torrent'])} {ratio}  {r['target']}{verdict} {r['note']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="p2p,throughput,swarm,dpsgd,paths")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, not a measurement)")
    ap.add_argument("--base-port", type=int, default=28000, help="below the ephemeral port range")
    ap.add_argument("--out", type=Path, default=ROOT / "eval/bench/results/comm.json")
    ap.add_argument("--calibrate", action="store_true",
                    help="with the paths rows: fit the path model's constants to the forced measurements and print them")
    args = ap.parse_args(argv)
    rows = set(args.rows.split(","))
    q = args.quick
    base = lambda n: free_base_port(n, args.base_port)  # noqa: E731
    table = Table()
    table.say(f"# dflsplit communication benchmark, {datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, "
              f"{mp.cpu_count()} CPUs; `python {' '.join(['eval/bench/comm.py', *sys.argv[1:]])}`")
    table.say(table.header())

    if "p2p" in rows:
        reps = 6 if q else 21
        tcp = statistics.median(scenario("tcp", 1, MB, reps, base(2)))
        tor = statistics.median(scenario("torrent", 1, MB, reps, base(2), **FORCE_TORRENT))
        table.add("point to point, 1 MB: median latency", "ms", 1000 * tcp, 1000 * tor, tor / tcp,
                  "torrent <= 50 ms", 1000 * tor <= 50)

    if "throughput" in rows:
        reps, size = (2 if q else 4), 100 * MB
        tcp = size / MB / statistics.median(scenario("tcp", 1, size, reps, base(2)))
        tor = size / MB / statistics.median(scenario("torrent", 1, size, reps, base(2), **FORCE_TORRENT))
        table.add("point to point, 100 MB: throughput", "MB/s", tcp, tor, tor / tcp,
                  "torrent >= 0.30 x tcp", tor / tcp >= 0.30)

    if "swarm" in rows:
        reps, size, cap = (2 if q else 4), 20 * MB, 20 * MB
        tcp = statistics.median(scenario("tcp", 8, size, reps, base(9), upload_limit=cap))
        tor = statistics.median(scenario("torrent", 8, size, reps, base(9), upload_limit=cap, **FORCE_TORRENT))
        table.add("1 -> 8 receivers, 20 MB, uploads 20 MB/s: time", "s", tcp, tor, tor / tcp,
                  "torrent <= 0.25 x tcp", tor / tcp <= 0.25)

    if "dpsgd" in rows:
        import importlib.util

        if importlib.util.find_spec("dflsplit.launch") is None:
            table.add("D-PSGD default (16 nodes): median round", "s", "n/a", "n/a",
                      note="dflsplit.launch.run_experiment is not available")
        else:
            extra = ["run.rounds=10"] if q else []
            tcp = dpsgd("tcp", base(16), extra)
            tor = dpsgd("torrent", base(16), extra)
            forced = dpsgd("torrent", base(16), extra + ["communication.path=torrent"])
            a, b, c = (s["median_round_seconds"] for s in (tcp, tor, forced))
            table.add("D-PSGD default (16 nodes): median round", "s", a, b, b / a, "torrent <= 1.5 x tcp", b / a <= 1.5,
                      note=f"(models inline; acc {tcp['test_acc_mean']:.4f} / {tor['test_acc_mean']:.4f})")
            table.add("  same, every model as a torrent", "s", a, c, c / a, "",
                      note=f"(acc {forced['test_acc_mean']:.4f})")

    if "sweep" in rows:
        sizes = [64 << 10, 256 << 10, MB, 4 * MB]
        for size in sizes:
            reps = 4 if q else 9
            tcp = statistics.median(scenario("tcp", 1, size, reps, base(2)))
            tor = statistics.median(scenario("torrent", 1, size, reps, base(2), **FORCE_TORRENT))
            table.add(f"sweep: 1 -> 1, {size >> 10} KiB, unlimited", "ms", 1000 * tcp, 1000 * tor, tor / tcp)
        for size in sizes:
            reps = 3 if q else 5
            cap = 12_500_000
            tcp = statistics.median(scenario("tcp", 4, size, reps, base(5), upload_limit=cap))
            tor = statistics.median(scenario("torrent", 4, size, reps, base(5), upload_limit=cap, **FORCE_TORRENT))
            table.add(f"sweep: 1 -> 4, {size >> 10} KiB, uploads 12.5 MB/s", "ms", 1000 * tcp, 1000 * tor, tor / tcp)

    if "paths" in rows:
        measured = paths_rows(table, base, q)
        if args.calibrate:
            table.say(f"# fitted path model: {fit_path_model(measured)}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "time": datetime.now().isoformat(timespec="seconds"), "host": platform.node(), "cpus": mp.cpu_count(),
        "command": " ".join(["python", "eval/bench/comm.py", *sys.argv[1:]]), "quick": q, "rows": table.rows,
    }, indent=1))
    args.out.with_suffix(".txt").write_text("\n".join(table.lines) + "\n")
    print(f"# written to {args.out} and {args.out.with_suffix('.txt')}")
    return 0 if all(r["ok"] is not False for r in table.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
