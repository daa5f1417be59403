"""A stranger sends a live node over 10,000 random and mutated frames (hypothesis), during its
handshakes and during training, many claiming other nodes' identities, plus junk TCP
connections; the run finishes and its results equal those of the same run undisturbed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dflsplit.communication.codec import encode
from dflsplit.mappings import ports_free
from dflsplit.results import read_json, read_run

from conftest import next_base_port, term_context

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NODES = 4
BATCH, EXAMPLES = 50, 210  # 10,500 frames
MAX_SOCKETS = 64  # open at once by the stranger
RUN_ID, CONFIG_HASH = "R" * 22, "C" * 64  # replaced by the run's own once it has them (same lengths)
KINDS = [b"HELLO", b"ACK", b"READY", b"REFUSE", b"BYE", b"DATA", b"TORRENT", b"", b"NOPE"]


def run_cmd(out: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "dflsplit.cli", "run", str(ROOT / "eval/configs/default.yaml"), "--out", str(out),
            "--no-progress", "--set", f"run.procs_per_machine={NODES}", "--set", "graph.degree=2",
            "--set", "run.rounds=150", "--set", "node.test_after=25", "--set", f"run.base_port={port}"]


def env_here() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def tensor_strategy():
    shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3)
    return st.builds(lambda shape, fill: torch.full(tuple(shape), fill, dtype=torch.float32), shapes,
                     st.floats(allow_nan=True, allow_infinity=True, width=32))


def body_strategy():
    header = st.fixed_dictionaries({}, optional={
        "uid": st.integers(-2, NODES + 2), "nonce": st.text(max_size=70), "session": st.text(max_size=70),
        "run": st.sampled_from([RUN_ID, "other-run", ""]),
        "config": st.sampled_from([CONFIG_HASH, "0" * 64]),
        "key": st.sampled_from(["model/0", "model/3", "model/149", "x" * 300, ""]), "h": st.dictionaries(
            st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
        "r": st.integers(-1, 200) | st.none(), "round": st.integers(-5, 500), "reason": st.text(max_size=20),
        "peers": st.lists(st.integers(-1, NODES + 1), max_size=5), "size": st.integers(-1, 1 << 40)})
    encoded = st.builds(lambda h, t: encode(h, t), header, st.dictionaries(st.sampled_from(["w", "torrent", "x"]),
                                                                          tensor_strategy(), max_size=2))

    def mutate(data: bytes, cuts: list[tuple[int, int]], keep: int) -> bytes:
        b = bytearray(data)
        for pos, val in cuts:
            if b:
                b[pos % len(b)] = val
        return bytes(b[:keep % (len(b) + 1)]) if keep else bytes(b)

    mutated = st.builds(mutate, encoded, st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                                                  max_size=4), st.integers(0, 1 << 16))
    return st.one_of(st.binary(max_size=512), encoded, mutated)


def frame_strategy():
    return st.tuples(
        st.sampled_from([b"0", b"1", b"2", b"3", b"\x01" * 16]) | st.binary(min_size=1, max_size=20).filter(
            lambda b: b[0] != 0),
        st.lists(st.sampled_from(KINDS) | st.binary(max_size=8), min_size=1, max_size=1),
        st.lists(body_strategy(), min_size=0, max_size=2))


def wait_bound(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while ports_free("127.0.0.1", [port]):
        assert time.monotonic() < deadline, f"port {port} never bound"
        time.sleep(0.05)


def junk_tcp(port: int, payload: bytes) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(payload)
    except OSError:
        pass


def generate_frames() -> list[tuple]:
    """10,500 frames drawn by hypothesis (derandomized: the same frames every run)."""
    frames: list[tuple] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(frame_strategy(), min_size=BATCH, max_size=BATCH), st.binary(max_size=300))
    def draw(batch, junk):
        frames.extend(batch)
        frames.append(("junk", junk))

    draw()
    return frames


def blast(port: int, frames: list[tuple], ctx: zmq.Context, sockets: dict, alive, identity=None) -> int:
    """Send `frames` to the node listening on `port` (never blocking: a frame the queues
    cannot take is retried for a moment, then counted as not sent); the number sent."""
    sent = 0
    for ident, *rest in frames:
        if not alive():
            break
        if ident == "junk":
            junk_tcp(port, rest[0])  # not ZeroMQ at all
            junk_tcp(port + 1, rest[0])  # the node's libtorrent port
            continue
        if ident not in sockets:
            if len(sockets) >= MAX_SOCKETS:  # the oldest goes (its frames still leave: linger)
                sockets.pop(next(iter(sockets))).close(linger=500)
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, ident)
            s.setsockopt(zmq.LINGER, 500)
            s.connect(f"tcp://127.0.0.1:{port}")
            sockets[ident] = s
        kind, bodies = rest
        if identity:
            bodies = [b.replace(RUN_ID.encode(), identity["run"].encode()).replace(
                CONFIG_HASH.encode(), identity["config"].encode()) for b in bodies]
        for _ in range(50):
            try:
                sockets[ident].send_multipart(kind + bodies, flags=zmq.NOBLOCK)
                sent += 1
                break
            except zmq.Again:
                time.sleep(0.01)
    return sent


def test_ten_thousand_hostile_frames_change_nothing(tmp_path):
    reference = subprocess.run(run_cmd(tmp_path / "reference", next_base_port(NODES + 1)), env=env_here(),
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr
    frames = generate_frames()
    port = next_base_port(NODES + 1)
    fuzzed = subprocess.Popen(run_cmd(tmp_path / "fuzzed", port), env=env_here(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 1 << 15)  # closed sockets linger while their frames leave
    sockets: dict[bytes, zmq.Socket] = {}
    alive = lambda: fuzzed.poll() is None  # noqa: E731
    try:
        wait_bound(port)  # node 0's control port: its handshakes start now
        half = len(frames) // 2
        sent = blast(port, frames[:half], ctx, sockets, alive)  # during the handshakes
        records = tmp_path / "fuzzed/machine_0/node_0.jsonl"
        deadline = time.monotonic() + 120
        while alive() and time.monotonic() < deadline and not (records.exists() and records.stat().st_size):
            time.sleep(0.05)
        info = read_json(tmp_path / "fuzzed/machine_0/run.json")
        identity = {"run": info.get("run_id", RUN_ID), "config": info.get("config_hash", CONFIG_HASH)}
        sent += blast(port, frames[half:], ctx, sockets, alive, identity)  # during training, with the run's id
        assert alive(), "the run ended before the fuzzing did: make it longer"
        out, err = fuzzed.communicate(timeout=600)
    finally:
        if fuzzed.poll() is None:
            os.killpg(fuzzed.pid, signal.SIGKILL)
        for s in sockets.values():
            s.close(0)
        term_context(ctx)
    assert sent >= 10_000, sent
    assert fuzzed.returncode == 0, err
    a, b = read_run(tmp_path / "reference"), read_run(tmp_path / "fuzzed")
    for uid in range(NODES):
        assert [(r["round"], r["train_loss"], r["test_acc"]) for r in a[uid]] == \
               [(r["round"], r["train_loss"], r["test_acc"]) for r in b[uid]], uid
    assert b[0][-1]["dropped"] > 1000  # node 0 saw the frames, and dropped them
    log = (tmp_path / "fuzzed/machine_0/node_0.log").read_text()
    assert log.count("\n") < 400, "junk must not flood the log"  # drops are summarised, not one line each
    json.dumps(read_json(tmp_path / "fuzzed/summary.json"))
