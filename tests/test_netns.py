"""Three hosts on one machine: network namespaces joined by veth pairs to a bridge, `eval/run.sh`
in each (machine id found from the namespace's own address), 12 D-PSGD nodes over the
torrent transport. Needs root (ip netns, tc); skipped with the reason otherwise. The
namespaces are removed even when the test fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from dflsplit.results import read_json, read_run

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.231.47"  # inside the namespaces this test creates, nowhere else
MACHINES = 3


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    probe = f"dflprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


def sh(*cmd: str, ns: str | None = None) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    out = subprocess.run(full, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(full)}: {out.stderr.strip()}")
    return out.stdout


@contextmanager
def three_hosts():
    """Namespaces h0..h2 (10.231.47.1-3/24) and a hub namespace with a bridge; yields
    (names, veth name in each host). Everything is removed on exit, processes included."""
    tag = f"dfl{os.getpid() % 100000}"
    hub, hosts = f"{tag}hub", [f"{tag}h{i}" for i in range(MACHINES)]
    made = []
    try:
        for ns in [hub, *hosts]:
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=hub)
        sh("ip", "link", "set", "br0", "up", ns=hub)
        for i, ns in enumerate(hosts):
            inner, outer = f"veth{i}", f"port{i}"
            sh("ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", hub)
            sh("ip", "link", "set", outer, "master", "br0", ns=hub)
            sh("ip", "link", "set", outer, "up", ns=hub)
            sh("ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", inner, ns=ns)
            sh("ip", "link", "set", inner, "up", ns=ns)
        yield hosts
    finally:
        for ns in made:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def veth_bytes(ns: str, i: int) -> tuple[int, int]:
    stats = Path("/sys/class/net")  # read inside the namespace
    rx = int(sh("cat", str(stats / f"veth{i}/statistics/rx_bytes"), ns=ns))
    tx = int(sh("cat", str(stats / f"veth{i}/statistics/tx_bytes"), ns=ns))
    return rx, tx


def run_on_hosts(hosts, tmp_path: Path, out: Path, extra: list[str]) -> list[tuple[int, str]]:
    ip = tmp_path / "ip.json"
    ip.write_text(json.dumps({str(i): f"{SUBNET}.{i + 1}" for i in range(MACHINES)}))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    for ns in hosts:
        cmd = ["ip", "netns", "exec", ns, str(ROOT / "eval/run.sh"), "-i", str(ip), "-p", "4", "-r", "6",
               "-b", "23000", str(ROOT / "eval/configs/default.yaml"), "--out", str(out), "--no-progress",
               "--set", "graph.degree=3", "--set", "node.test_after=2", "--set", "run.start_timeout=120",
               "--set", "communication.path=torrent", *extra]  # every model as a torrent
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=tmp_path))
    results = []
    for p in procs:
        try:
            output, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            output, _ = p.communicate()
        results.append((p.returncode, output))
    return results


def test_three_hosts_train_together_and_shaped_links_slow_the_rounds(tmp_path):
    with three_hosts() as hosts:
        before = [veth_bytes(ns, i) for i, ns in enumerate(hosts)]
        results = run_on_hosts(hosts, tmp_path, tmp_path / "fast", [])
        assert all(rc == 0 for rc, _ in results), "\n".join(o for _, o in results)
        after = [veth_bytes(ns, i) for i, ns in enumerate(hosts)]
        summary = read_json(tmp_path / "fast" / "summary.json")
        assert summary["nodes"] == 12 and summary["machines"] == 3 and summary["machines_missing"] == []
        run = read_run(tmp_path / "fast")
        assert sorted(run) == list(range(12))
        for uid, records in run.items():
            assert [r["round"] for r in records] == list(range(6))
            tested = [r["test_acc"] for r in records if r["test_acc"] is not None]
            assert tested[-1] > tested[0], (uid, tested)  # accuracy rises on every node
        for i in range(MACHINES):  # every host sent and received across its link (models are >100 kB)
            assert after[i][0] - before[i][0] > 1_000_000 and after[i][1] - before[i][1] > 1_000_000, (i, before, after)
        fast = summary["median_round_seconds"]

        for i, ns in enumerate(hosts):  # 2 Mbit/s out of every host
            sh("tc", "qdisc", "add", "dev", f"veth{i}", "root", "tbf", "rate", "2mbit", "burst", "32kbit",
               "latency", "400ms", ns=ns)
        results = run_on_hosts(hosts, tmp_path, tmp_path / "slow", [])
        assert all(rc == 0 for rc, _ in results), "\n".join(o for _, o in results)
        slow = read_json(tmp_path / "slow" / "summary.json")
        assert slow["nodes"] == 12
        print(f"median round: {fast:.3f} s unshaped, {slow['median_round_seconds']:.3f} s at 2 Mbit/s per host")
        # the shaped links carry the same models at a fraction of the rate: rounds take longer
        assert slow["median_round_seconds"] > 2 * fast, (fast, slow["median_round_seconds"])
