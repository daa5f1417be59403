"""Crashed and restarted peers, errors that surface at once, and bounded, counted hostile input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
from safetensors.torch import load_file

from dflsplit.communication import (
    PayloadRejected, PeerTimeout, TransportFailed, build_transport,
)
from dflsplit.communication.base import Mailbox, Message
from dflsplit.communication.control import ZmqTransport
from dflsplit.config import load_config, section_from_dict
from dflsplit.launch import RunFailed, run_experiment
from dflsplit.mappings import LinearMapping
from dflsplit.node.checkpoint import pack, read_checkpoint, repair_results, unpack, write_checkpoint
from dflsplit.results import read_run

from conftest import in_parallel, next_base_port, term_context

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "eval" / "configs" / "default.yaml"


def env_here() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def pair(**kw):
    """Two started, connected tcp transports of one run."""
    mapping = LinearMapping(1, 2, {0: "127.0.0.1"}, next_base_port(2))
    cfg = section_from_dict("communication", name="tcp", hello_timeout=10, timeout=10, **kw)
    ts = [build_transport(u, mapping, cfg, {"run": "r", "config": "c"}) for u in range(2)]
    for t in ts:
        t.start()
    in_parallel([lambda t=t: t.connect([1 - t.uid]) for t in ts], timeout=30)
    return mapping, ts


def close(ts):
    in_parallel([lambda t=t: t.close(timeout=1) for t in ts], timeout=30)


# --- the mailbox -----------------------------------------------------------------------------


def test_mailbox_drops_duplicates_past_rounds_and_overflow():
    box = Mailbox(max_messages=3)
    assert box.put(Message(1, "model/0", {}, round=0)) is None
    assert box.put(Message(1, "model/0", {}, round=0)) == "duplicate message (same key and sender)"
    assert box.put(Message(2, "model/0", {}, round=0)) is None
    assert box.put(Message(2, "model/1", {}, round=1)) is None
    assert box.put(Message(3, "model/1", {}, round=1)).startswith("mailbox full")
    assert box.expire(1) == 2  # both round-0 messages go
    assert box.put(Message(3, "model/0", {}, round=0)) == "message of a round already past"
    assert box.put(Message(1, "model/1", {}, round=1)) is None
    assert [m.sender for m in (box.take(lambda m: True, 0), box.take(lambda m: True, 0))] == [2, 1]


def test_a_duplicate_publish_is_dropped_and_counted():
    _, ts = pair()
    try:
        ts[0].publish("model/0", {"x": torch.ones(2)}, to=[1])
        ts[0].publish("model/0", {"x": torch.full((2,), 9.0)}, to=[1])
        assert torch.equal(ts[1].receive("model/0", 0).tensors["x"], torch.ones(2))
        with pytest.raises(PeerTimeout):
            ts[1].receive("model/0", 0, timeout=0.5)
        assert ts[1].dropped.counts()["duplicate message (same key and sender)"] == 1
    finally:
        close(ts)


# --- errors surface ---------------------------------------------------------------------------


def test_a_receive_handler_that_raises_fails_the_transport_with_its_cause(monkeypatch):
    def broken(self, sender, body):
        raise RuntimeError("boom in the handler")

    _, ts = pair()
    monkeypatch.setattr(ZmqTransport, "_on_data", broken)
    try:
        ts[0].publish("model/0", {"x": torch.ones(2)}, to=[1])
        with pytest.raises(TransportFailed, match="control-plane handler for a 'DATA' frame from node 0 failed: "
                                                  "RuntimeError: boom in the handler"):
            ts[1].receive("model/0", 0, timeout=60)  # a timeout would raise PeerTimeout, after 60 s
    finally:
        close(ts)


def test_a_node_whose_handler_raises_fails_the_run_with_the_cause(tmp_path, monkeypatch):
    def broken(self, sender, body):
        raise RuntimeError("boom in the handler")

    monkeypatch.setattr(ZmqTransport, "_on_data", broken)  # inherited by the forked nodes
    cfg = load_config(CONFIG, ["run.procs_per_machine=2", "graph.degree=1", "run.rounds=2", "run.progress=false",
                               "communication.name=tcp", f"run.base_port={next_base_port(3)}"])
    with pytest.raises(RunFailed, match=r"node \d failed: TransportFailed: node \d: control-plane handler for a "
                                        r"'DATA' frame from node \d failed: RuntimeError: boom in the handler"):
        run_experiment(cfg, tmp_path / "run")


# --- hostile and oversized input ----------------------------------------------------------------


def test_an_oversized_control_frame_is_dropped_and_counted_and_the_node_goes_on():
    mapping, ts = pair(max_message_bytes=64 << 10)
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 2000)
        s.connect(mapping.control_address(1))
        s.send_multipart([b"DATA", b"\0" * (1 << 20)])  # 1 MiB against a 64 KiB cap
        s.close()
        deadline = time.monotonic() + 10
        reason = "connection dropped (a frame over max_message_bytes, broken framing, or a peer that went away)"
        while time.monotonic() < deadline and not ts[1].dropped.counts().get(reason):
            time.sleep(0.05)
        assert ts[1].dropped.counts()[reason] >= 1
        ts[0].publish("model/0", {"x": torch.ones(3)}, to=[1])
        assert torch.equal(ts[1].receive("model/0", 0).tensors["x"], torch.ones(3))
    finally:
        term_context(ctx)
        close(ts)


def test_payloads_over_their_limit_or_not_finite_are_rejected_and_counted():
    _, ts = pair()
    try:
        ts[1].limit_payload("model/", 1000)
        ts[0].publish("model/0", {"x": torch.zeros(1000)}, to=[1])  # 4000 bytes
        with pytest.raises(PayloadRejected, match=r"'model/0' from node 0 rejected: payload larger than expected"):
            ts[1].receive("model/0", 0)
        bad = torch.ones(10)
        bad[3] = float("nan")
        ts[0].publish("other/0", {"x": bad}, to=[1])
        with pytest.raises(PayloadRejected, match=r"1 non-finite value\(s\) in 'x'"):
            ts[1].receive("other/0", 0, expect={"x": ((10,), "float32")})
        assert ts[1].rejected == 2
    finally:
        close(ts)


@pytest.mark.slow
def test_a_nan_attacker_is_rejected_and_counted_and_the_honest_nodes_learn(tmp_path):
    cfg = load_config(CONFIG, ["run.procs_per_machine=5", "graph.degree=4", "run.rounds=6", "node.test_after=3",
                               "run.progress=false", f"run.base_port={next_base_port(6)}",
                               "attack.name=nan", "attack.nodes=[4]", "sharing.aggregator=mean"])
    summary = run_experiment(cfg, tmp_path / "run")
    run = read_run(tmp_path / "run")
    honest = [u for u in run if u != 4]
    assert all(run[u][-1]["rejected"] >= 6 for u in honest)  # one NaN model per round from node 4
    assert summary["test_acc_mean"] > 0.5  # the NaN models never reached an average


# --- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_a_half_written_results_line(tmp_path):
    state = {"model": {"w": torch.randn(3, 2)}, "opt": {"state": {0: {"m": torch.ones(2)}}, "groups": [
        {"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]}, "rng": torch.Generator().manual_seed(3).get_state()}
    tensors = {}
    back = unpack(json.loads(json.dumps(pack(state, tensors))), tensors)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["opt"]["groups"][0]["betas"] == (0.9, 0.99)
    assert back["opt"]["state"][0]["m"].sum() == 2
    write_checkpoint(tmp_path, 5, 3, state, {"round": 3})
    write_checkpoint(tmp_path, 5, 4, state, {"round": 4})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["node_5-r4.safetensors", "node_5.json"]
    round_, loaded, record = read_checkpoint(tmp_path, 5)
    assert round_ == 4 and record == {"round": 4} and torch.equal(loaded["model"]["w"], state["model"]["w"])
    results = tmp_path / "node_5.jsonl"
    results.write_text('{"round": 0}\n{"round": 1}\n{"rou')
    assert repair_results(results) == 1
    assert results.read_text() == '{"round": 0}\n{"round": 1}\n'


def small_gossip(out: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dflsplit.cli", "run", str(CONFIG), "--out", str(out), "--no-progress",
            "--set", "run.procs_per_machine=6", "--set", "graph.degree=3", "--set", f"run.base_port={port}",
            "--set", "run.on_peer_failure=skip", "--set", "communication.timeout=5", "--set",
            "node.save_model=true", *extra]


@pytest.mark.slow
def test_sixteen_nodes_three_killed_at_round_10_the_others_finish_and_keep_learning(tmp_path):
    cfg = load_config(CONFIG, ["run.rounds=25", "node.test_after=5", "run.progress=false", "run.on_peer_failure=skip",
                               "communication.timeout=5", "run.crash={3: 10, 7: 10, 11: 10}",
                               f"run.base_port={next_base_port(17)}"])
    summary = run_experiment(cfg, tmp_path / "run", say=lambda line: None)
    assert sorted(map(int, summary["failed_nodes"])) == [3, 7, 11]
    files = sorted((tmp_path / "run" / "machine_0").glob("node_*.jsonl"))
    assert len(files) == 16
    for f in files:  # complete, valid JSON lines
        records = [json.loads(line) for line in f.read_text().splitlines()]
        assert f.read_text().endswith("\n")
        uid = int(f.stem.split("_")[1])
        assert [r["round"] for r in records] == list(range(10 if uid in (3, 7, 11) else 25))
    run = read_run(tmp_path / "run")
    survivors = [u for u in run if u not in (3, 7, 11)]
    acc = {r: sum(run[u][r]["test_acc"] for u in survivors) / len(survivors) for r in (9, 14, 19, 24)}
    assert acc[9] < acc[14] < acc[19] <= acc[24] + 0.01, acc  # keeps rising after the crash
    assert all(any(r.get("peers_missing") for r in run[u]) for u in survivors
               if set(cfg_neighbours(tmp_path / "run")[u]) & {3, 7, 11})


def cfg_neighbours(run_dir: Path) -> dict[int, list[int]]:
    from dflsplit.graphs import Graph

    g = Graph.read(run_dir / "machine_0" / "graph.edges")
    return {u: g.neighbors(u) for u in range(g.n)}


@pytest.mark.slow
def test_a_killed_node_resumes_and_matches_a_run_in_which_it_idles_the_rounds_it_missed(tmp_path):
    rounds = 200
    common = ["--set", f"run.rounds={rounds}", "--set", "run.checkpoint_every=1", "--set", "node.test_after=20",
              "--set", "training.local_steps=10"]
    killed = tmp_path / "killed"
    cmd = small_gossip(killed, next_base_port(7), *common, "--set", "run.crash={2: 5}")
    # the run at a low priority, so that the restarted node's process starts while the run still goes on
    main = subprocess.Popen(cmd, env=env_here(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: os.nice(15))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "node 2 failed" not in (main.stdout.readline() or "node 2 failed"):
            pass
        resumed = subprocess.run(cmd + ["--resume", "--nodes", "2"], env=env_here(), capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        out, _ = main.communicate(timeout=300)
        assert main.returncode == 0, out
    finally:
        if main.poll() is None:
            main.kill()
    records = read_run(killed)[2]
    rounds_run = [r["round"] for r in records]
    assert rounds_run[:5] == [0, 1, 2, 3, 4]
    back = rounds_run[5]
    assert back > 5 and rounds_run[5:] == list(range(back, rounds)), rounds_run  # no duplicates, no gaps after
    # the same run in which node 2 deliberately sits out rounds 5 .. back-1
    idle = tmp_path / "idle"
    out = subprocess.run(small_gossip(idle, next_base_port(7), *common, "--set", f"run.absent={{2: [5, {back - 1}]}}"),
                         env=env_here(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for uid in range(6):
        a = load_file(str(killed / "machine_0" / f"model_{uid}.safetensors"))
        b = load_file(str(idle / "machine_0" / f"model_{uid}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), uid
        ra, rb = read_run(killed)[uid], read_run(idle)[uid]
        assert [(r["round"], r["train_loss"], r["test_acc"]) for r in ra] == \
               [(r["round"], r["train_loss"], r["test_acc"]) for r in rb], uid


@pytest.mark.slow
def test_no_node_outlives_a_launcher_killed_with_sigkill(tmp_path):
    import psutil

    cmd = [sys.executable, "-m", "dflsplit.cli", "run", str(CONFIG), "--out", str(tmp_path / "run"), "--no-progress",
           "--set", "run.procs_per_machine=4", "--set", "graph.degree=2", "--set", "run.rounds=1000",
           "--set", f"run.base_port={next_base_port(5)}"]
    launcher = subprocess.Popen(cmd, env=env_here(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "run/machine_0/node_3.jsonl").exists():
            time.sleep(0.2)
        nodes = psutil.Process(launcher.pid).children()
        assert len(nodes) == 4
        launcher.kill()  # SIGKILL: the launcher cannot clean up
        launcher.wait()
        gone, alive = psutil.wait_procs(nodes, timeout=60)
        assert not alive, alive
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_a_receive_thread_that_dies_fails_the_transport_with_its_cause(monkeypatch):
    from dflsplit.communication.control import ControlPlane

    def broken(self, frames):
        raise zmq.ZMQError(zmq.EFAULT, "receive failed")

    _, ts = pair()
    monkeypatch.setattr(ControlPlane, "_on_frames", broken)
    try:
        ts[0].publish("model/0", {"x": torch.ones(2)}, to=[1])
        with pytest.raises(TransportFailed, match="control-plane receive thread failed: ZMQError"):
            ts[1].receive("model/0", 0, timeout=60)
    finally:
        close(ts)
