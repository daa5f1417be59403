"""The `torrent` transport: real libtorrent sessions and ZeroMQ sockets on loopback."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import libtorrent as lt
import pytest
import torch
import zmq

from dflsplit.communication import (
    BindError, CommError, PayloadMismatch, PayloadRejected, PeerTimeout, TransportFailed, build_transport,
)
from dflsplit.communication import torrent as torrent_module
from dflsplit.communication.codec import describe, encode
from dflsplit.communication.torrent import TORRENT, TorrentTransport, default_spool_parent, piece_size
from dflsplit.communication.torrent_receiver import Receiver
from dflsplit.communication.torrent_settings import rate_limited_everywhere
from dflsplit.config import CommunicationConfig, section_from_dict
from dflsplit.mappings import LinearMapping

from conftest import in_parallel, next_base_port, term_context
from test_torrent_receiver import frame, torrent_bytes

MB = 1 << 20


def config(**kw) -> CommunicationConfig:
    kw = {"path": "torrent", "lazy_start": False, "timeout": 20, "hello_timeout": 10, **kw}  # all payloads as torrents
    return section_from_dict("communication", **{"name": "torrent", **kw})


@contextlib.contextmanager
def cluster(n, per_node=None, base=None, start=None, name="torrent", **kw):
    """`n` started and mutually connected transports (node i gets `per_node[i]` overrides);
    `start` restricts which uids live in this process. Closed (and checked clean) on exit."""
    base = base or next_base_port(n)
    mapping = LinearMapping(1, n, {0: "127.0.0.1"}, base)
    uids = list(range(n)) if start is None else list(start)
    ts = {}
    for u in uids:
        cfg = config(**{**kw, **((per_node or {}).get(u, {}))})
        cfg.name = name
        ts[u] = build_transport(u, mapping, cfg)
        ts[u].start()
    try:
        in_parallel([lambda t=t: t.connect([u for u in range(n) if u != t.uid]) for t in ts.values()])
        yield ts
    finally:
        in_parallel([lambda t=t: t.close(timeout=3) for t in ts.values()])
    for t in ts.values():
        if isinstance(t, TorrentTransport):
            assert not t.spool.exists(), f"node {t.uid} left {t.spool}"


def payload(nbytes: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(seed))


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


# --- round trips --------------------------------------------------------------------


def test_exact_round_trip_of_dtypes_and_empty_payloads():
    tensors = {
        "f32": torch.randn(33, 7),
        "f64": torch.randn(5, dtype=torch.float64),
        "f16": torch.randn(4, 4).half(),
        "bf16": torch.randn(9).bfloat16(),
        "i64": torch.arange(-50, 50, dtype=torch.int64),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.5),
    }
    with cluster(3) as ts:
        ts[0].publish("model/0", tensors, to=[1, 2], header={"round": 0})
        ts[0].publish("nothing", {}, to=[1])
        for r in (1, 2):
            m = ts[r].receive("model/0", 0, expect=describe(tensors))
            assert m.sender == 0 and m.header == {"round": 0}
            assert set(m.tensors) == set(tensors)
            for k, v in tensors.items():
                assert m.tensors[k].dtype == v.dtype and torch.equal(m.tensors[k], v), k
        assert ts[1].receive("nothing", 0).tensors == {}
        assert len(files_under(ts[0].spool / "out")) == 2  # both went as torrents


def test_200_mb_round_trip():
    x = payload(200 * MB, seed=3)
    with cluster(2) as ts:
        ts[0].publish("big", {"w": x}, to=[1])
        m = ts[1].receive("big", 0, timeout=60)
        assert torch.equal(m.tensors["w"], x)
        assert ts[1].peer_bytes()[0][1] >= 200 * MB
    assert piece_size(200 * MB) == 512 << 10 and piece_size(MB) == 16 << 10


def test_auto_path_follows_the_path_model():
    """With path auto the transport takes the path `communication.paths` chooses: inline for a
    small payload, for one receiver and for receivers that publish at the same time; a
    torrent for a large payload to several idle receivers."""
    from collections import Counter

    from dflsplit.communication.paths import DEFAULT_MODEL

    cap = 2_000_000
    small, big = torch.randn(1000), torch.randn(256 << 10)  # 4 kB, 1 MiB
    cases = [("small", small, [1, 2, 3, 4], False), ("big", big, [1, 2, 3, 4], False),
             ("one", big, [1], False), ("gossip", big, [1, 2, 3, 4], True)]
    expected = [DEFAULT_MODEL.choose(x.numel() * 4, len(to), cap, concurrent=c) for _, x, to, c in cases]
    assert expected == ["inline", "torrent", "inline", "inline"]  # the model, for these cases
    with cluster(5, path="auto", upload_limit=cap) as ts:
        for key, x, to, concurrent in cases:
            ts[0].publish(key, {"w": x}, to=to, concurrent=concurrent)
            for u in to:
                assert torch.equal(ts[u].receive(key, 0, timeout=60).tensors["w"], x)
        assert ts[0].paths == Counter(expected)
        outgoing = [p.name for p in files_under(ts[0].spool / "out")]
        assert len(outgoing) == 1, outgoing  # only the big one for idle receivers became a torrent


def test_one_to_eight_receivers_swarm():
    size = 8 * MB
    x = payload(size, seed=1)
    # the publisher's upload is the bottleneck, so receivers fetch from each other
    # (the time it takes, against 8 copies at the cap: eval/bench/transport_checks.py)
    with cluster(9, per_node={0: {"upload_limit": 8 * MB}}) as ts:
        ts[0].publish("model/0", {"w": x}, to=list(range(1, 9)))
        for r in range(1, 9):
            assert torch.equal(ts[r].receive("model/0", 0, timeout=30).tensors["w"], x)
        publisher_up = sum(up for up, _ in ts[0].peer_bytes().values())
        from_co_receivers = sum(
            down for r in range(1, 9) for who, (_, down) in ts[r].peer_bytes().items() if who != 0
        )
        to_co_receivers = sum(
            up for r in range(1, 9) for who, (up, _) in ts[r].peer_bytes().items() if who != 0
        )
    assert from_co_receivers > 2 * size, (from_co_receivers, publisher_up)
    assert to_co_receivers == from_co_receivers  # both ends of each exchange counted the same
    assert publisher_up < 4 * size  # not 8 × size: the receivers served the rest
    assert publisher_up + from_co_receivers >= 8 * size


# --- rate limits ------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["upload", "download"])
def test_rate_limits_are_applied_to_lan_peers(side):
    """The limit is libtorrent's, on the node that has it only, and applies to peers on the
    LAN and loopback too (whether the rate is met: eval/bench/transport_checks.py)."""
    rate = 4 * MB
    x = payload(MB, seed=2)
    node = 0 if side == "upload" else 1
    with cluster(2, per_node={node: {f"{side}_limit": rate}}) as ts:
        for t in ts.values():
            settings = t.session.get_settings()
            limited = rate if t.uid == node else 0
            assert settings[f"{side}_rate_limit"] == limited
            assert t.session.get_peer_class(lt.session.global_peer_class_id)[f"{side}_limit"] == limited
        ts[0].publish("model/0", {"w": x}, to=[1])
        assert torch.equal(ts[1].receive("model/0", 0).tensors["w"], x)
        assert ts[1].peer_bytes()[0][1] >= MB
    # every address is in the global peer class, whose limits are the session's (by
    # default loopback and LAN addresses are in the unlimited "local" class)
    classes = rate_limited_everywhere()
    for ip in ("127.0.0.1", "127.0.0.2", "10.0.0.7", "192.168.1.1", "::1"):
        assert classes.access(ip) == 1 << lt.session.global_peer_class_id


# --- failures ---------------------------------------------------------------------------

def publisher_main(base, n, upload, size, spool, ready):
    """Node 0 of an `n`-node run, in a forked process: publish one payload, then idle."""
    torch.set_num_threads(1)  # no OpenMP pool in a forked child
    mapping = LinearMapping(1, n, {0: "127.0.0.1"}, base)
    t = build_transport(0, mapping, config(upload_limit=upload, spool_dir=str(spool)))
    t.start()
    t.connect(range(1, n))
    t.publish("model/0", {"w": payload(size, seed=5)}, to=list(range(1, n)))
    ready.set()
    time.sleep(600)


@contextlib.contextmanager
def publisher_process(base, n, upload, size, spool):
    """The publisher in a forked process (started before this process opens any socket)."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=publisher_main, args=(base, n, upload, size, spool, ready), daemon=True)
    proc.start()
    try:
        yield proc, ready
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


def start_receivers(n, base, **kw):
    """Receivers 1..n-1 of a run whose publisher (node 0) runs in another process."""
    mapping = LinearMapping(1, n, {0: "127.0.0.1"}, base)
    ts = [build_transport(u, mapping, config(**kw)) for u in range(1, n)]
    for t in ts:
        t.start()
    return ts


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_publisher_receivers_complete_from_each_other(tmp_path):
    n, size = 3, 4 * MB
    x = payload(size, seed=5)

    def attempt(spool) -> bool:
        """Kill the publisher once the pieces exist among the receivers; False when both
        receivers were already complete by then (the kill came too late to test anything)."""
        base = next_base_port(n)
        # the publisher sends at 4 MB/s, and receivers pass pieces on at 0.5 MB/s each: the
        # pieces exist among them after ~1 s, ~0.6 s before either could be complete
        with publisher_process(base, n, 4 * MB, size, spool) as (proc, ready):
            rs = start_receivers(n, base, upload_limit=MB // 2, timeout=30)
            try:
                in_parallel([lambda r=r: r.connect([0]) for r in rs])
                assert ready.wait(20)

                def pieces():
                    states = [r.progress("model/0", 0) for r in rs]
                    return None if None in states else [s["pieces"] for s in states]

                wait_for(lambda: pieces() is not None and all(map(any, zip(*pieces()))), 20,
                         "the pieces to exist among receivers")
                held = pieces()
                proc.kill()
                proc.join(10)
                if all(all(p) for p in held):
                    return False
                for r in rs:
                    assert torch.equal(r.receive("model/0", 0).tensors["w"], x)
                # each got pieces from the other: the publisher was gone before they were complete
                assert all(r.peer_bytes().get(other.uid, (0, 0))[1] > 0 for r in rs for other in rs if other is not r)
                return True
            finally:
                in_parallel([lambda r=r: r.close(timeout=1) for r in rs])

    # a starved test process may see the pieces spread too late; it gets three tries
    assert any(attempt(tmp_path / f"spool{i}") for i in range(3)), "receivers were complete before every kill"


def test_killed_publisher_ends_in_a_peer_timeout(tmp_path):
    n, size = 3, 8 * MB
    base = next_base_port(n)
    with publisher_process(base, n, 256 * 1024, size, tmp_path / "spool") as (proc, ready):
        rs = start_receivers(n, base)
        try:
            in_parallel([lambda r=r: r.connect([0]) for r in rs])
            assert ready.wait(20)
            wait_for(lambda: all(r.progress("model/0", 0) for r in rs), 10, "the announcements")
            proc.kill()
            proc.join(10)
            errors = {}

            def receive(r):
                try:
                    r.receive("model/0", 0, timeout=2)
                except PeerTimeout as e:
                    errors[r.uid] = e

            in_parallel([lambda r=r: receive(r) for r in rs])
            assert sorted(errors) == [1, 2]
            for e in errors.values():
                assert "'model/0'" in str(e) and "node 0" in str(e) and "announced" in str(e)
                assert e.peer == 0 and e.key == "model/0"
        finally:
            in_parallel([lambda r=r: r.close(timeout=1) for r in rs])


def corrupt(path: Path, offset: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def test_piece_served_corrupted_fails_its_hash_and_is_fetched_again():
    size = 4 * MB
    x = payload(size, seed=6)
    # receiver 2 is slow, so it is still downloading when receiver 1's copy goes bad
    with cluster(3, per_node={2: {"download_limit": 2 * MB}}) as ts:
        ts[0].publish("model/0", {"w": x}, to=[1, 2])
        assert torch.equal(ts[1].receive("model/0", 0).tensors["w"], x)
        done = ts[1].progress("model/0", 0)
        corrupt(Path(done["path"]), 0, done["total"])  # every piece of receiver 1's copy
        m = ts[2].receive("model/0", 0)
        assert torch.equal(m.tensors["w"], x)
        assert ts[2].hash_failures > 0


def test_own_copy_corrupted_on_disk_is_checked_again_and_refetched():
    size = 4 * MB
    x = payload(size, seed=7)
    with cluster(2, per_node={1: {"download_limit": 2 * MB}}) as ts:
        ts[0].publish("model/0", {"w": x}, to=[1])
        state = {}

        def some_piece_held():
            p = ts[1].progress("model/0", 0)
            if p and any(p["pieces"]) and p["done"] < 0.7 * p["total"]:
                state.update(p)
                return True
            return False

        wait_for(some_piece_held, 10, "a first piece")
        i = state["pieces"].index(True)
        corrupt(Path(state["path"]), i * state["piece_length"], 64)
        m = ts[1].receive("model/0", 0)
        assert torch.equal(m.tensors["w"], x)
        assert ts[1].verify_failures == 1


def test_payload_mismatch_names_sender_and_key():
    with cluster(2) as ts:
        ts[0].publish("model/3", {"w": torch.randn(10, 3)}, to=[1])
        with pytest.raises(PayloadMismatch, match=r"'model/3' from node 0.*'w' is \(\(10, 3\), 'float32'\), "
                                                  r"expected \(\(3, 10\), 'float32'\)"):
            ts[1].receive("model/3", 0, expect={"w": ((3, 10), "float32")})


# --- disk use, access, errors -----------------------------------------------------------


def test_retired_keys_leave_nothing_and_close_leaves_nothing():
    with cluster(2, retention_rounds=1) as ts:
        for r in range(4):
            for t in ts.values():
                t.advance(r)
            ts[0].publish(f"model/{r}", {"w": payload(MB, seed=r)}, to=[1])
            ts[1].receive(f"model/{r}", 0)
            kept = [s for s in range(r + 1) if r - s <= 1]
            for t in ts.values():
                assert len(files_under(t.spool)) == len(kept), (r, files_under(t.spool))
                assert [k for k in range(r + 1) if t.progress(f"model/{k}", 0)] == kept
        spools = [t.spool for t in ts.values()]
        assert all(p.parent == default_spool_parent(None) for p in spools)  # /dev/shm when writable
    assert not any(p.exists() for p in spools)


def test_stale_spool_of_a_dead_process_is_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"dflsplit-{dead.stdout.strip()}-n0-abcd"
    (stale / "out" / "0").mkdir(parents=True)
    (stale / "out" / "0" / "n0-0.safetensors").write_bytes(b"x" * 100)
    alive = tmp_path / f"dflsplit-{os.getpid()}-n9-abcd"
    alive.mkdir()
    with cluster(2, spool_dir=str(tmp_path)) as ts:
        assert not stale.exists() and alive.exists()
        assert all(t.spool.parent == tmp_path for t in ts.values())


def test_only_hosts_of_the_mapping_may_connect():
    with cluster(2) as ts:
        ts[0].publish("model/0", {"w": payload(MB)}, to=[1])
        ts[1].receive("model/0", 0)
        info_hash = bytes.fromhex(ts[0].progress("model/0", 0)["info_hash"])
        handshake = b"\x13BitTorrent protocol" + bytes(8) + info_hash + b"-XX0000-" + bytes(12)
        port = ts[0].mapping.data_port(0)

        def answer(source: str) -> bytes:
            with socket.socket() as s:
                s.settimeout(3)
                s.bind((source, 0))
                s.connect(("127.0.0.1", port))
                s.sendall(handshake)
                try:
                    return s.recv(68)
                except (ConnectionResetError, socket.timeout):
                    return b""

        assert answer("127.0.0.1")[:20] == handshake[:20]  # a host of the run gets the handshake back
        assert answer("127.0.0.2") == b""  # any other address is cut off

        # the control plane drops frames from ids outside the run
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, b"77")
        s.connect(ts[1].mapping.control_address(1))
        s.send_multipart([TORRENT, encode({"key": "evil", "peers": []},
                                          {"torrent": torch.zeros(4, dtype=torch.uint8)})])
        time.sleep(0.3)
        s.close(0)
        term_context(ctx)
        assert ts[1].progress("evil", 77) is None and len(ts[1].mailbox) == 0


def test_data_port_in_use_is_named():
    base = next_base_port(2)
    mapping = LinearMapping(1, 2, {0: "127.0.0.1"}, base)
    with socket.socket() as s:
        s.bind(("127.0.0.1", mapping.data_port(1)))
        s.listen()
        t = build_transport(1, mapping, config())
        with pytest.raises(BindError, match=rf"node 1: cannot bind data port {mapping.data_port(1)}"):
            t.start()
        assert t.spool is None or not t.spool.exists()


def test_malformed_announcements_are_dropped_and_named_in_the_timeout():
    with cluster(2) as ts:
        bad = {
            "model/0": frame({"key": "model/0"}, meta=bytes(range(50))),  # not bencoded
            "model/1": frame({"key": "model/1", "size": 99}),  # disagrees with the torrent
            "model/2": frame({"key": "model/2"}, meta=torrent_bytes(  # two files
                name=b"d", files=[{b"length": 50, b"path": [b"a"]}, {b"length": 50, b"path": [b"b"]}])),
            "model/3": frame({"key": "model/3"}, meta=torrent_bytes(name=b"../x")),  # a path trick
        }
        for body in bad.values():
            ts[0].control.send(1, TORRENT, body)
        ts[0].control.send(1, TORRENT, frame({"key": 7}))  # no key at all
        x = payload(MB)
        ts[0].publish("model/4", {"w": x}, to=[1])  # after them on the same socket
        assert torch.equal(ts[1].receive("model/4", 0).tensors["w"], x)
        assert ts[1].dropped.counts() == {"malformed TORRENT frame": 5}
        assert ts[1].failure is None and ts[1].rejected == 0
        for key, reason in [("model/0", "torrent metadata rejected"), ("model/1", "announced size 99 bytes"),
                            ("model/2", "2 files"), ("model/3", "not a plain file name")]:
            with pytest.raises(PeerTimeout, match=rf"no '{key}' from node 0 .*announcement was dropped: .*{reason}"):
                ts[1].receive(key, 0, timeout=0.2)
        assert len(files_under(ts[1].spool / "in")) == 1  # model/4 only


@pytest.mark.parametrize("limit_by", ["limit_payload", "max_message_bytes"])
def test_torrent_larger_than_expected_is_refused_before_any_piece(limit_by):
    limit = 64 * 1024
    per_node = {1: {"max_message_bytes": limit}} if limit_by == "max_message_bytes" else {}
    with cluster(2, per_node=per_node) as ts:
        if limit_by == "limit_payload":
            ts[1].limit_payload("model/", limit)
        x = payload(MB)
        ts[0].publish("model/0", {"w": x}, to=[1])
        size = ts[0].progress("model/0", 0)["total"]
        with pytest.raises(PayloadRejected, match=rf"payload 'model/0' from node 0 rejected: torrent larger than "
                                                  rf"expected \({size} bytes, at most {limit}\)"):
            ts[1].receive("model/0", 0)  # at once, not at the timeout
        assert ts[1].rejected == 1 and ts[1].rejections.counts() == {"torrent larger than expected": 1}
        assert ts[1].payload_bytes_received == 0  # libtorrent's own counter
        assert ts[1].progress("model/0", 0) is None  # never in the session
        assert files_under(ts[1].spool / "in") == []
        assert ts[0].peer_bytes().get(1, (0, 0)) == (0, 0)
        small = torch.randn(1000)  # a payload within the limit still arrives
        ts[0].publish("model/1", {"w": small}, to=[1])
        assert torch.equal(ts[1].receive("model/1", 0).tensors["w"], small)


# --- errors surface -------------------------------------------------------------------------


def test_an_alert_handler_that_raises_fails_the_node_with_its_cause(monkeypatch):
    def broken(self, t, old):
        raise RuntimeError("flush handler broke")

    monkeypatch.setattr(Receiver, "_enter_flushing", broken)
    with cluster(2) as ts:
        ts[0].publish("model/0", {"w": payload(MB)}, to=[1])
        with pytest.raises(TransportFailed, match=r"node 1: torrent alert handler \(\w+\) failed: "
                                                  r"RuntimeError: flush handler broke") as e:
            ts[1].receive("model/0", 0, timeout=60)  # not a PeerTimeout after 60 s
        assert isinstance(e.value.__cause__, RuntimeError)
        with pytest.raises(TransportFailed):  # and every later receive
            ts[1].receive("model/1", 0, timeout=60)


def test_a_verify_worker_that_raises_fails_the_node_with_its_cause(monkeypatch):
    def broken(path, info, key):
        raise MemoryError("no room to decode")

    monkeypatch.setattr(torrent_module, "verify_payload", broken)
    with cluster(2) as ts:
        ts[0].publish("model/0", {"w": payload(MB)}, to=[1])
        with pytest.raises(TransportFailed, match=r"node 1: torrent verify worker failed: MemoryError: no room"):
            ts[1].receive("model/0", 0, timeout=60)


def test_the_alert_thread_dying_fails_the_node_with_its_cause():
    with cluster(2) as ts:
        def broken():
            raise OSError("wake pipe gone")

        ts[1].plane._drain_wake = broken
        ts[1].plane._wake()
        with pytest.raises(TransportFailed, match=r"node 1: torrent alert thread failed: OSError: wake pipe gone"):
            ts[1].receive("model/0", 0, timeout=60)
        with pytest.raises(TransportFailed):  # what needs the thread fails at once too
            ts[1].advance(1)


def test_entering_a_round_while_another_thread_starts_the_plane_is_not_an_error():
    """A lazy plane starting for an announcement (on the control thread) while the node
    enters a round: the round's retirement has nothing to retire yet, so it is no error."""
    with cluster(2, lazy_start=True) as ts:
        plane = ts[1].plane
        assert plane.session is None
        listening, release = threading.Event(), threading.Event()
        start_session = plane._start_session

        def slow_start_session():
            start_session()  # the session exists; the alert thread does not yet
            listening.set()
            assert release.wait(20)

        plane._start_session = slow_start_session
        starter = threading.Thread(target=plane.ensure_started)
        starter.start()
        try:
            assert listening.wait(20)
            ts[1].advance(1)  # was: CommError "retiring old torrents: the torrent data plane is not running"
        finally:
            release.set()
            starter.join(20)
        ts[0].advance(1)
        ts[0].publish("model/1", {"w": payload(MB)}, to=[1])
        assert torch.equal(ts[1].receive("model/1", 0).tensors["w"], payload(MB))
        ts[1].advance(4)  # and retirement works once it runs
        assert ts[1].progress("model/1", 0) is None


def test_a_host_that_does_not_resolve_is_named_at_start():
    mapping = LinearMapping(2, 1, {0: "127.0.0.1", 1: "no-such-host.invalid"}, next_base_port(2))
    t = build_transport(0, mapping, config())
    with pytest.raises(CommError, match=r"node 0: cannot resolve host 'no-such-host.invalid' of machine 1 "
                                        r"\(run.hosts or run.ip_file\): .+"):
        t.start()
    assert t.spool is None and t.control is None  # nothing was made


# --- a whole run ------------------------------------------------------------------------


@pytest.mark.slow
def test_dpsgd_over_torrent_reaches_the_accuracy_of_tcp(tmp_path):
    from dflsplit.config import load_config
    from dflsplit.launch import run_experiment

    root = Path(__file__).resolve().parents[1]
    summaries = {}
    for name in ("tcp", "torrent"):
        cfg = load_config(root / "eval/configs/default.yaml", overrides=[
            "run.procs_per_machine=8", "run.rounds=10", f"run.base_port={next_base_port(8)}", "run.progress=false",
            f"communication.name={name}",
            *(["communication.path=torrent"] if name == "torrent" else []),  # every model as a torrent
        ])
        summaries[name] = run_experiment(cfg, out_dir=tmp_path / name, progress=False)
    tcp, torrent = summaries["tcp"], summaries["torrent"]
    assert torrent["transport"] == "torrent" and tcp["test_acc_mean"] > 0.5
    # the same seed and exact tensors: the same models, node by node
    assert torrent["final_test_acc"] == tcp["final_test_acc"]
    assert torrent["bytes_sent"] > tcp["bytes_sent"]  # BitTorrent's own messages on top
