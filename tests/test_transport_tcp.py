"""The ZeroMQ control plane and the tcp transport, over loopback."""

import threading
import time

import pytest
import torch
import zmq

from dflsplit.communication import BindError, PayloadMismatch, PeerTimeout, build_transport, ratelimit
from dflsplit.communication.codec import describe, encode
from dflsplit.communication.control import ControlPlane
from dflsplit.communication.ratelimit import TokenBucket
from dflsplit.config import CommunicationConfig
from dflsplit.mappings import LinearMapping, MappingError

from conftest import in_parallel, term_context


def start_all(n, base_port, **cfg_kw):
    mapping = LinearMapping(1, n, {0: "127.0.0.1"}, base_port)
    cfg = CommunicationConfig(name="tcp", timeout=5, hello_timeout=5, **cfg_kw)
    ts = [build_transport(i, mapping, cfg) for i in range(n)]
    for t in ts:
        t.start()
    return mapping, ts


def connect_full(ts):
    in_parallel([lambda t=t: t.connect([u.uid for u in ts if u is not t]) for t in ts])


def close_all(ts):
    in_parallel([lambda t=t: t.close(timeout=5) for t in ts])


def test_publish_to_several_receivers_exact_and_counted(base_port):
    _, ts = start_all(4, base_port)
    try:
        connect_full(ts)
        tensors = {"w": torch.randn(100, 7), "b": torch.arange(5, dtype=torch.int32), "e": torch.zeros(0)}
        ts[0].publish("model/0", tensors, to=[1, 2, 3], header={"round": 0})
        for r in ts[1:]:
            m = r.receive("model/0", 0, expect=describe(tensors))
            assert m.sender == 0 and m.key == "model/0" and m.header == {"round": 0}
            for k in tensors:
                assert torch.equal(m.tensors[k], tensors[k])
        payload = len(encode({"key": "model/0", "h": {"round": 0}}, tensors))
        assert ts[0].bytes_sent >= 3 * payload
        assert all(r.bytes_received >= payload for r in ts[1:])
    finally:
        close_all(ts)


def test_receive_by_key_out_of_order_and_receive_any(base_port):
    _, ts = start_all(2, base_port)
    try:
        connect_full(ts)
        for k in ("a/2", "a/1", "b/1"):
            ts[0].publish(k, {"x": torch.tensor([float(len(k))])}, to=[1])
        assert ts[1].receive("a/1", 0).key == "a/1"
        assert ts[1].receive_any(prefix="b/").key == "b/1"
        assert ts[1].receive_any().key == "a/2"
    finally:
        close_all(ts)


def test_receive_timeout_names_peer_and_key(base_port):
    _, ts = start_all(2, base_port)
    try:
        connect_full(ts)
        with pytest.raises(PeerTimeout, match=r"node 1: no 'model/3' from node 0 within 0.3 s") as e:
            ts[1].receive("model/3", 0, timeout=0.3)
        assert (e.value.peer, e.value.key, e.value.timeout) == (0, "model/3", 0.3)
    finally:
        close_all(ts)


def test_hello_timeout_names_missing_peer(base_port):
    mapping, ts = start_all(1, base_port)
    big = LinearMapping(1, 3, {0: "127.0.0.1"}, base_port)
    ts[0].mapping = big  # peers 1 and 2 never start
    ts[0].control.mapping = big
    with pytest.raises(PeerTimeout, match=r"no 'HELLO' from node 1, 2"):
        ts[0].connect([1, 2], timeout=0.5)
    ts[0].close(timeout=0.2)


def test_payload_mismatch_names_sender_and_key(base_port):
    _, ts = start_all(2, base_port)
    try:
        connect_full(ts)
        ts[0].publish("m", {"w": torch.zeros(3)}, to=[1])
        with pytest.raises(PayloadMismatch, match=r"payload 'm' from node 0 rejected: 'w' is \(\(3,\), 'float32'\)"):
            ts[1].receive("m", 0, expect={"w": ((4,), "float32")})
        ts[0].publish("n", {"w": torch.zeros(3)}, to=[1])
        with pytest.raises(PayloadMismatch, match="missing tensor 'v'"):
            ts[1].receive("n", 0, expect={"w": ((3,), "float32"), "v": ((1,), "float32")})
    finally:
        close_all(ts)


def test_unknown_ids_and_malformed_frames_are_dropped(base_port):
    mapping, ts = start_all(2, base_port)
    ctx = zmq.Context()
    try:
        connect_full(ts)
        for ident, body in ((b"99", encode({"key": "evil", "h": {}})), (b"abc", b"junk"), (b"0", b"junk")):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, ident)
            s.setsockopt(zmq.LINGER, 1000)
            s.connect(mapping.control_address(1))
            s.send_multipart([b"DATA", body])
            s.close()
        ts[0].publish("ok", {"x": torch.ones(1)}, to=[1])
        assert ts[1].receive("ok", 0).key == "ok"
        with pytest.raises(PeerTimeout):
            ts[1].receive_any(timeout=0.3, prefix="evil")
        assert len(ts[1].mailbox) == 0
    finally:
        term_context(ctx)
        close_all(ts)


def test_port_in_use_is_an_error_naming_node_and_port(base_port):
    mapping, ts = start_all(1, base_port)
    try:
        other = build_transport(0, mapping, ts[0].cfg)
        with pytest.raises(BindError, match=rf"node 0: cannot bind control port {base_port}"):
            other.start()
        with pytest.raises(MappingError, match=rf"node 0: port {base_port} .* already in use"):
            mapping.check_ports_free(0)
    finally:
        ts[0].close(timeout=0.2)


def test_bye_waits_for_peers_then_returns(base_port):
    _, ts = start_all(2, base_port)
    connect_full(ts)
    ts[0].publish("last", {"x": torch.ones(1000)}, to=[1])
    done = threading.Event()

    def closer():
        ts[0].close(timeout=5)
        done.set()

    threading.Thread(target=closer).start()
    time.sleep(0.3)
    assert not done.is_set()  # node 0 waits for node 1's BYE
    assert ts[1].receive("last", 0).tensors["x"].sum() == 1000
    ts[1].close(timeout=5)
    assert done.wait(5)


def test_close_does_not_linger_on_a_dead_peer(base_port, monkeypatch):
    """A peer that never said BYE is given up at once: its frames are dropped instead of
    lingering (how long close takes: eval/bench/transport_checks.py)."""
    closing = []
    real_close = ControlPlane.close
    monkeypatch.setattr(ControlPlane, "close", lambda self, linger_ms=2000, gone=(): (
        closing.append((self.uid, set(gone))), real_close(self, linger_ms, gone))[1])
    _, ts = start_all(3, base_port)
    connect_full(ts)
    ts[1].control.close(linger_ms=0)  # node 1 dies without a BYE
    closing.clear()
    in_parallel([lambda: ts[0].close(timeout=0.5), lambda: ts[2].close(timeout=0.5)])
    assert sorted(closing) == [(0, {1}), (2, {1})]  # node 2 said BYE to node 0 and back
    assert ts[0].control._ctx.closed and ts[2].control._ctx.closed


@pytest.mark.parametrize("side", ["upload", "download"])
def test_rate_limit_meters_every_byte(base_port, side):
    """Every frame passes the limited node's token bucket (whether the rate is met:
    eval/bench/transport_checks.py)."""
    rate = 4_000_000
    mapping = LinearMapping(1, 2, {0: "127.0.0.1"}, base_port)
    node = 0 if side == "upload" else 1
    cfgs = [CommunicationConfig(name="tcp", timeout=10, hello_timeout=5,
                                **({f"{side}_limit": rate} if u == node else {})) for u in range(2)]
    ts = [build_transport(u, mapping, cfgs[u]) for u in range(2)]
    for t in ts:
        t.start()
    try:
        connect_full(ts)
        chunk = {"x": torch.arange(250_000, dtype=torch.float32)}  # 1 MB
        for i in range(3):
            ts[0].publish(f"c{i}", chunk, to=[1])
        for i in range(3):
            assert torch.equal(ts[1].receive(f"c{i}", 0).tensors["x"], chunk["x"])
        data_frames = sum(len(b"DATA") + len(encode(ts[0].wire_head(f"c{i}", None), chunk)) for i in range(3))
        for t in ts:
            for direction, bucket, total in (("upload", t.control.up, t.control.bytes_sent),
                                             ("download", t.control.down, t.control.bytes_received)):
                if (t.uid, direction) == (node, side):
                    # every DATA frame (handshake frames may bypass a download bucket)
                    assert bucket.rate == rate and data_frames <= bucket.passed <= total
                else:  # the other direction and the other node are not limited
                    assert bucket.rate == 0 and bucket.passed == 0
    finally:
        close_all(ts)


def test_token_bucket_lets_rate_bytes_through_per_second(monkeypatch):
    """The bucket's arithmetic on a fake clock: a burst passes at once, then each byte
    waits 1/rate seconds, and idle time refills the bucket up to its capacity only."""
    now = [100.0]
    slept = []
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: now[0])

    def sleep(s):
        slept.append(s)
        now[0] += s

    monkeypatch.setattr(ratelimit.time, "sleep", sleep)
    b = TokenBucket(1000, burst=500)
    assert b.consume(500) == 0.0  # the burst
    assert b.consume(1000) == pytest.approx(1.0)  # a second's worth waits a second
    assert b.consume(250) == pytest.approx(0.25)
    now[0] += 10.0  # idle: refilled to the capacity, not to 10 s worth
    assert b.consume(500) == 0.0
    assert b.consume(100) == pytest.approx(0.1)
    assert slept == pytest.approx([1.0, 0.25, 0.1]) and b.passed == 2350
    assert TokenBucket(0).consume(10**9) == 0.0  # unlimited
