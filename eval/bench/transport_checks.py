#!/usr/bin/env python3
"""Timing checks of the transports: the figures the tests do not assert on.

Each row prints the measured figure next to its target, how far off it is, and the method.
Rows:

* ``swarm``: one torrent publisher, 8 receivers, 8 MB, publisher upload capped at 8 MB/s:
  time until the last receiver has it, against 8 copies sent at the cap (8 s);
* ``rates``: upload and download caps of 4 MB/s on `torrent` and `tcp`, 8 MB point to
  point: the link's rate, size / (time capped - time uncapped), against the cap (±15 %);
* ``timeout``: ``receive(timeout=0.3)`` for a key nobody sends: time until PeerTimeout;
* ``close``: ``close(timeout=0.5)`` with a peer that died without a BYE: time it takes
  (target ≤ 1.5 s: the BYE wait, not the 2 s socket linger);
* ``killed``: a torrent publisher killed mid-transfer: time until ``receive(timeout=2)``
  raises PeerTimeout at each receiver;
* ``failure``: an alert handler of a receiver raises during a transfer: time from the
  raise to TransportFailed in the ``receive`` already waiting (target ≤ 1 s, not the
  timeout);
* ``refusal``: a torrent larger than the receiver's limit: time from the announcement's
  publish to PayloadRejected (target ≤ 1 s, not the timeout).

``swarm`` and ``rates`` run every node in its own process (eval/bench/comm.py's
`scenario`: the first repetition dropped as warm-up, the median of the rest); the other
rows run the nodes in this process, except the killed publisher. Usage::

    python eval/bench/transport_checks.py [--rows swarm,rates,timeout,close,killed,failure,refusal] [--quick]

Results go to eval/bench/results/transport_checks.json (and .txt beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import platform
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval" / "bench"))

from comm import FORCE_TORRENT, scenario  # noqa: E402
from dflsplit.communication import (  # noqa: E402
    PayloadRejected, PeerTimeout, TransportFailed, build_transport,
)
from dflsplit.config import section_from_dict  # noqa: E402
from dflsplit.mappings import LinearMapping, free_base_port  # noqa: E402

MB = 1 << 20


class Report:
    def __init__(self):
        self.rows: list[dict] = []
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def row(self, name: str, measured: float, unit: str, target: str, ok: bool, method: str,
            reference: float | None = None, ratio: bool = False) -> None:
        """One figure; beside it, its deviation from `reference` (or, with `ratio`, the
        fraction of `reference` it is)."""
        if not reference:
            off = ""
        elif ratio:
            off = f" ({measured / reference:.2f} x {reference:g} {unit})"
        else:
            off = f" ({100 * (measured - reference) / reference:+.1f} %)"
        self.rows.append({"row": name, "measured": measured, "unit": unit, "target": target, "ok": ok,
                          "reference": reference, "method": method})
        self.say(f"{name}: measured {measured:.3f} {unit}{off}; target {target}: {'ok' if ok else 'MISSED'}")
        self.say(f"    method: {method}")


def config(name: str, **kw):
    kw = {"timeout": 60.0, "hello_timeout": 20.0, **(FORCE_TORRENT if name == "torrent" else {}), **kw}
    return section_from_dict("communication", name=name, **kw)


@contextlib.contextmanager
def nodes(name: str, n: int, base: int, per_node=None, **kw):
    """`n` started, connected transports in this process; closed on exit."""
    mapping = LinearMapping(1, n, {0: "127.0.0.1"}, base)
    ts = [build_transport(u, mapping, config(name, **{**kw, **(per_node or {}).get(u, {})})) for u in range(n)]
    for t in ts:
        t.start()
    try:
        threads = [threading.Thread(target=t.connect, args=([u for u in range(n) if u != t.uid],)) for t in ts]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        yield ts
    finally:
        threads = [threading.Thread(target=t.close, kwargs={"timeout": 3}) for t in ts]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)


def swarm(report: Report, quick: bool, base) -> None:
    size, cap, reps = 8 * MB, 8 * MB, (3 if quick else 6)
    t = statistics.median(scenario("torrent", 8, size, reps, base(9), upload_limit=cap, **FORCE_TORRENT))
    serial = 8 * size / cap
    report.row("swarm 1 -> 8, 8 MB, publisher upload 8 MB/s: time to the last receiver", t, "s",
               f"< {serial:.2f} s (8 copies at the cap)", t < serial,
               f"9 processes on loopback, every upload capped at 8 MB/s; publish to receive at the last "
               f"receiver, median of {reps - 1} repetitions", serial, ratio=True)


def rates(report: Report, quick: bool, base) -> None:
    size, rate, reps = 8 * MB, 4 * MB, (3 if quick else 5)
    for name in ("torrent", "tcp"):
        extra = FORCE_TORRENT if name == "torrent" else {}
        free = statistics.median(scenario(name, 1, size, reps, base(2), **extra))
        for side in ("upload", "download"):
            capped = statistics.median(scenario(name, 1, size, reps, base(2), **{f"{side}_limit": rate}, **extra))
            measured = size / max(1e-9, capped - free) / MB
            report.row(f"{name} {side} cap {rate / MB:.2f} MB/s: link rate", measured, "MB/s",
                       f"{rate / MB:.2f} MB/s ± 15 %", abs(measured * MB - rate) <= 0.15 * rate,
                       f"8 MB point to point, 2 processes, both nodes capped; size / (median time capped - "
                       f"median time uncapped = {free:.3f} s), {reps - 1} repetitions each", rate / MB)


def timeout(report: Report, quick: bool, base) -> None:
    for name in ("tcp", "torrent"):
        with nodes(name, 2, base(2)) as ts:
            waits = []
            for _ in range(3 if quick else 10):
                t0 = time.monotonic()
                try:
                    ts[1].receive("never", 0, timeout=0.3)
                except PeerTimeout:
                    waits.append(time.monotonic() - t0)
            w = statistics.median(waits)
        report.row(f"{name} receive(timeout=0.3 s) for a key nobody sends: time to PeerTimeout", w, "s",
                   "0.3 s (at most 2 s)", w <= 2.0, f"2 nodes in one process, median of {len(waits)}", 0.3)


def close(report: Report, quick: bool, base) -> None:
    for name in ("tcp", "torrent"):
        times = []
        for _ in range(2 if quick else 5):
            mapping = LinearMapping(1, 2, {0: "127.0.0.1"}, base(2))
            ts = [build_transport(u, mapping, config(name)) for u in range(2)]
            for t in ts:
                t.start()
            threads = [threading.Thread(target=t.connect, args=([1 - t.uid],)) for t in ts]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            ts[1].control.close(linger_ms=0)  # node 1 dies without a BYE
            t0 = time.monotonic()
            ts[0].close(timeout=0.5)
            times.append(time.monotonic() - t0)
            if name == "torrent":
                ts[1]._shutdown_data_plane()
        w = statistics.median(times)
        report.row(f"{name} close(timeout=0.5 s) with a dead peer: time", w, "s", "<= 1.5 s", w <= 1.5,
                   f"2 nodes in one process, node 1's sockets closed without a BYE; median of {len(times)}", 0.5)


def _publisher(base, n, size, ready):
    import torch

    torch.set_num_threads(1)
    mapping = LinearMapping(1, n, {0: "127.0.0.1"}, base)
    t = build_transport(0, mapping, config("torrent", upload_limit=256 * 1024))
    t.start()
    t.connect(range(1, n))
    t.publish("model/0", {"w": torch.randn(size // 4)}, to=list(range(1, n)))
    ready.set()
    time.sleep(600)


def killed(report: Report, quick: bool, base) -> None:
    n, size = 3, 8 * MB
    b = base(n)
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_publisher, args=(b, n, size, ready), daemon=True)
    proc.start()
    mapping = LinearMapping(1, n, {0: "127.0.0.1"}, b)
    rs = [build_transport(u, mapping, config("torrent")) for u in range(1, n)]
    waits = {}
    try:
        for r in rs:
            r.start()
        threads = [threading.Thread(target=r.connect, args=([0],)) for r in rs]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        ready.wait(30)
        deadline = time.monotonic() + 10
        while not all(r.progress("model/0", 0) for r in rs) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()
        proc.join(10)

        def receive(r):
            t0 = time.monotonic()
            try:
                r.receive("model/0", 0, timeout=2)
            except PeerTimeout:
                waits[r.uid] = time.monotonic() - t0

        threads = [threading.Thread(target=receive, args=(r,)) for r in rs]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
        for r in rs:
            r.close(timeout=1)
    w = max(waits.values()) if len(waits) == len(rs) else float("nan")
    report.row("torrent publisher killed mid-transfer: time to PeerTimeout(timeout=2 s)", w, "s",
               "2 s (at most 3 s)", len(waits) == len(rs) and w <= 3.0,
               "publisher in a forked process at 256 KB/s, 8 MB, killed once both receivers hold the torrent; "
               "the slower of the 2 receivers", 2.0)


def failure(report: Report, quick: bool, base) -> None:
    import torch

    from dflsplit.communication.torrent_receiver import Receiver

    raised: list[float] = []
    real = Receiver._enter_flushing

    def broken(self, t, old):
        raised.append(time.monotonic())
        raise RuntimeError("handler broke")

    delays = []
    Receiver._enter_flushing = broken
    try:
        for i in range(2 if quick else 5):
            raised.clear()
            with nodes("torrent", 2, base(2)) as ts:
                got = []

                def receive():
                    try:
                        ts[1].receive("model/0", 0, timeout=60)
                    except TransportFailed:
                        got.append(time.monotonic())

                th = threading.Thread(target=receive)
                th.start()
                ts[0].publish("model/0", {"w": torch.randn(MB // 4)}, to=[1])
                th.join(70)
            if got and raised:
                delays.append(got[0] - raised[0])
    finally:
        Receiver._enter_flushing = real
    w = max(delays) if delays else float("nan")
    report.row("torrent alert handler raises during a transfer: time to TransportFailed in receive", w, "s",
               "<= 1 s (not the 60 s timeout)", bool(delays) and w <= 1.0,
               f"2 nodes in one process, the FLUSHING handler patched to raise; the longest of {len(delays)}")


def refusal(report: Report, quick: bool, base) -> None:
    import torch

    delays = []
    for i in range(2 if quick else 5):
        with nodes("torrent", 2, base(2)) as ts:
            ts[1].limit_payload("model/", 64 * 1024)
            t0 = time.monotonic()
            ts[0].publish("model/0", {"w": torch.randn(MB // 4)}, to=[1])
            try:
                ts[1].receive("model/0", 0, timeout=60)
            except PayloadRejected:
                delays.append(time.monotonic() - t0)
    w = max(delays) if delays else float("nan")
    report.row("torrent larger than the receiver's limit: publish to PayloadRejected", w, "s",
               "<= 1 s (not the 60 s timeout)", bool(delays) and w <= 1.0,
               f"1 MB payload, 64 KiB limit, 2 nodes in one process; the longest of {len(delays)} "
               f"(publish includes spooling and hashing)")


ROWS = {"swarm": swarm, "rates": rates, "timeout": timeout, "close": close, "killed": killed,
        "failure": failure, "refusal": refusal}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, not a measurement)")
    ap.add_argument("--base-port", type=int, default=27000, help="below the ephemeral port range")
    ap.add_argument("--out", type=Path, default=ROOT / "eval/bench/results/transport_checks.json")
    args = ap.parse_args(argv)
    logging.getLogger("dflsplit").setLevel(logging.CRITICAL)  # the rows provoke warnings and errors on purpose
    base = lambda n: free_base_port(n, args.base_port)  # noqa: E731
    report = Report()
    command = " ".join(["python", "eval/bench/transport_checks.py", *sys.argv[1:]])
    report.say(f"# dflsplit transport checks, {datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, "
               f"{mp.cpu_count()} CPUs; `{command}`")
    for row in args.rows.split(","):
        ROWS[row](report, args.quick, base)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "time": datetime.now().isoformat(timespec="seconds"), "host": platform.node(), "cpus": mp.cpu_count(),
        "command": command, "quick": args.quick, "rows": report.rows,
    }, indent=1))
    args.out.with_suffix(".txt").write_text("\n".join(report.lines) + "\n")
    print(f"# written to {args.out} and {args.out.with_suffix('.txt')}")
    return 0 if all(r["ok"] for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
