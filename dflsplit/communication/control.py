"""ZeroMQ control plane, and the transport that carries every payload on it (`tcp`).

Each node binds one ROUTER socket on its control port and opens one DEALER socket per
peer to send. A frame is ``[kind, body]`` where body is a codec message.

**Who sent a frame.** A DEALER's routing id is 16 random bytes, so no other process can
take or guess it. A connection counts as node p only once it proved it: node X sends
HELLO (its run id, config hash and a fresh nonce) to p's address from the mapping, and
p answers ACK with the nonce from its own DEALER; only the process listening at p's
address saw the nonce, so the connection that echoes it is p's. Once X has
authenticated p it sends READY, and `connect` returns when every peer authenticated
this node and was authenticated by it. Frames of any other kind are accepted only from
an authenticated connection; a stranger's frames, whatever id they claim, are dropped
and counted, and cannot block or replace the real node's connection. A HELLO with
another run id or config hash is answered with REFUSE (echoing its nonce, so nobody can
forge one), and the refused node fails naming the run it met. With CURVE keys a frame is
moreover accepted only under the node id whose key authenticated it. A peer that
restarts (a new session id in its HELLO) is authenticated again.

**Limits.** Frames over ``communication.max_message_bytes`` make ZeroMQ drop the
connection before buffering them; receive queues hold at most ``communication.max_queue``
frames per peer; sends wait at most ``communication.timeout`` for a full queue. Dropped
input is counted per reason (`Transport.dropped`) and logged rate-limited.

**Failures.** Malformed input is dropped; an exception in a handler or a dead receive
thread fails the transport (`Transport.fail`): every waiting receive raises at once.

Kinds: HELLO / ACK / READY / REFUSE (handshake), BYE (shutdown), DATA (header + tensors).
Subclasses add their own kinds through `handle_frame`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from .base import (
    BindError, CommError, DropCounter, Mailbox, Message, PayloadRejected, PeerGone, PeerTimeout, Transport,
    check_finite, check_payload,
)
from .codec import CodecError, decode, decode_header, encode, tensor_bytes
from .keys import CurveKeys
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

HELLO, ACK, READY, REFUSE, BYE, DATA = b"HELLO", b"ACK", b"READY", b"REFUSE", b"BYE", b"DATA"
HANDSHAKE = (HELLO, ACK, READY, REFUSE)
HELLO_RESEND = 2.0  # seconds between HELLOs to a peer that has not answered
GONE_GRACE = 0.5  # seconds a peer's connection is closed before a receive from it gives up
CHALLENGE_INTERVAL = 1.0  # at most one HELLO per second to a peer in answer to its (new session) HELLO
MAX_NONCES = 8  # outstanding HELLO nonces kept per peer


class BadFrame(ValueError):
    """Input that is not a valid frame; dropped and counted under `reason` (a category, the
    same for every frame of its kind), never fatal. `detail` is logged with the first one."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def wire_round(head: Mapping[str, Any]) -> int | None:
    """The publisher's round stamped in a payload's head (None when absent or not an int)."""
    r = head.get("r")
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _field(head: Mapping[str, Any], name: str, kind: type) -> Any:
    value = head.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadFrame("frame with a missing or mistyped field",
                       f"{name!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


class ControlPlane:
    """One node's ZeroMQ sockets (a ROUTER to receive, a DEALER per peer to send), the
    authentication of its peers' connections, and its receive thread.

    `identity` (run id and config hash) must match a peer's for the handshake to succeed.
    `on_frame(sender, kind, body)` gets every frame of an authenticated peer except the
    handshake's; it may raise `BadFrame` or `CodecError` for malformed input (dropped),
    anything else fails the transport through `on_failure(exc, where)`.
    """

    POLL_MS = 50

    def __init__(
        self,
        uid: int,
        mapping,
        on_frame: Callable[[int, bytes, memoryview], None],
        upload_limit: int = 0,
        download_limit: int = 0,
        keys: CurveKeys | None = None,
        identity: Mapping[str, Any] | None = None,
        max_message_bytes: int = 256 << 20,
        max_queue: int = 1000,
        send_timeout: float = 120.0,
        dropped: DropCounter | None = None,
        on_failure: Callable[[BaseException, str], None] | None = None,
        round_of: Callable[[], tuple[int, float]] = lambda: (0, 0.0),
        on_peer_down: Callable[[int], None] = lambda peer: None,
        shared=None,
    ):
        self.uid = uid
        self.keys = keys
        self.mapping = mapping
        self.on_frame = on_frame
        self.identity = {"run": "", "config": "", **dict(identity or {})}
        self.session = secrets.token_hex(8)
        self.max_message_bytes = int(max_message_bytes)
        self.max_queue = int(max_queue)
        self.send_timeout = float(send_timeout)
        self.dropped = dropped or DropCounter(log, f"node {uid}")
        self.on_failure = on_failure or (lambda exc, where: log.error("node %d: %s failed: %r", uid, where, exc))
        self.round_of = round_of
        self.on_peer_down = on_peer_down
        self.up = TokenBucket(upload_limit)
        self.down = TokenBucket(download_limit)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._own_ctx = shared is None  # else the process's context, closed by whoever made it
        self._ctx = zmq.Context() if shared is None else shared.context()
        if keys:
            self._auth = keys.start_authenticator(self._ctx) if shared is None else shared.authenticator(keys)
        else:
            self._auth = None
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVHWM, self.max_queue)
        self._router.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + 64)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a peer's reconnection under its own id
        if keys:
            keys.secure_server(self._router)
        self._monitor = self._router.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        address = f"tcp://{mapping.host(uid)}:{mapping.control_port(uid)}"
        try:
            self._router.bind(address)
        except zmq.ZMQError as e:
            self._teardown_sockets()
            raise BindError(
                f"node {uid}: cannot bind control port {mapping.control_port(uid)} on "
                f"{mapping.host(uid)} ({e}); choose another run.base_port"
            ) from None
        self._dealers: dict[int, zmq.Socket] = {}
        self._dealer_monitors: dict[zmq.Socket, int] = {}  # monitor of our connection to a peer → peer
        self._monitors_changed = False
        self._down: dict[int, float] = {}  # peer → since when its connection is closed (monotonic)
        self._locks: dict[int, threading.Lock] = {}
        self._dealers_lock = threading.Lock()
        self._count_lock = threading.Lock()
        # handshake state, guarded by _hs
        self._hs = threading.Condition()
        self._nonces: dict[int, list[str]] = {}  # peer → nonces of our HELLOs it has not answered
        self._auth_rid: dict[int, bytes] = {}  # peer → routing id of its authenticated connection
        self._rid_uid: dict[bytes, int] = {}
        self._ready_from: set[int] = set()  # peers that authenticated this node
        self._pending_ready: dict[bytes, int] = {}  # READY seen on a connection not yet authenticated
        self._sessions: dict[int, str] = {}
        self._challenged: dict[int, float] = {}  # peer → when we last sent it a HELLO
        self._refused: dict[int, str] = {}
        self._peer_rounds: dict[int, tuple[int, float]] = {}  # (round, pace) of a peer when it answered our HELLO
        self._goodbyes = 0
        self._stop = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"control-{uid}", daemon=True)

    def _teardown_sockets(self) -> None:
        self._router.disable_monitor()
        self._monitor.close(linger=0)
        self._router.close()
        if self._own_ctx:
            if self._auth:
                self._auth.stop()
            self._ctx.term()

    def start(self) -> None:
        """Start receiving (call once whoever handles frames is ready for them)."""
        self._thread.start()

    # sending ---------------------------------------------------------------------------
    def _dealer(self, peer: int) -> tuple[zmq.Socket, threading.Lock]:
        with self._dealers_lock:
            if peer not in self._dealers:
                self.mapping.machine_rank(peer)  # raises for ids outside the run
                s = self._ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.IDENTITY, b"\x01" + secrets.token_bytes(15))  # unguessable, first byte not 0
                s.setsockopt(zmq.SNDHWM, self.max_queue)
                s.setsockopt(zmq.SNDTIMEO, max(1, int(self.send_timeout * 1000)))
                s.setsockopt(zmq.LINGER, 5000)
                if self.keys:
                    self.keys.secure_client(s, peer)
                # connected / disconnected: a peer whose process is gone is known at once
                monitor = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
                s.connect(self.mapping.control_address(peer))
                self._dealers[peer] = s
                self._dealer_monitors[monitor] = peer
                self._monitors_changed = True
                self._locks[peer] = threading.Lock()
            return self._dealers[peer], self._locks[peer]

    def send(self, peer: int, kind: bytes, body: bytes, block: bool = True) -> None:
        """Queue one frame to `peer` (after the upload token bucket lets it pass). Raises
        CommError when the frame is over ``max_message_bytes`` or the peer's queue stays
        full for the send timeout (at once when not `block`: the receive thread's answers
        never wait for a peer)."""
        n = len(kind) + len(body)
        if len(body) > self.max_message_bytes:
            raise CommError(
                f"node {self.uid}: a {kind.decode(errors='replace')} frame of {len(body)} bytes to node {peer} "
                f"exceeds communication.max_message_bytes ({self.max_message_bytes}); raise it on every machine")
        self.up.consume(n)
        sock, lock = self._dealer(peer)
        try:
            with lock:
                sock.send_multipart([kind, body], copy=len(body) < 65536, flags=0 if block else zmq.NOBLOCK)
        except zmq.Again:
            waited = f"for {self.send_timeout:g} s" if block else "(not waiting)"
            raise CommError(
                f"node {self.uid}: node {peer}'s send queue stayed full ({self.max_queue} frames, "
                f"communication.max_queue) {waited}: is it alive?") from None
        with self._count_lock:
            self.bytes_sent += n

    def count_received(self, n: int) -> None:
        with self._count_lock:
            self.bytes_received += n

    def count_sent(self, n: int) -> None:
        with self._count_lock:
            self.bytes_sent += n

    # handshake -------------------------------------------------------------------------
    def hello(self, peer: int, block: bool = True) -> None:
        """Send `peer` a HELLO with a fresh nonce (at most `MAX_NONCES` kept per peer)."""
        nonce = secrets.token_hex(16)
        with self._hs:
            nonces = self._nonces.setdefault(peer, [])
            nonces.append(nonce)
            del nonces[:-MAX_NONCES]
            self._challenged[peer] = time.monotonic()
        body = encode({"uid": self.uid, "session": self.session, "nonce": nonce, **self.identity})
        log.debug("node %d: HELLO to node %d", self.uid, peer)
        self.send(peer, HELLO, body, block=block)

    def handshake(self, peers: Iterable[int], timeout: float) -> None:
        """Authenticate `peers` and be authenticated by them within `timeout` seconds.

        Raises CommError when a peer refused this node (another run or config), and
        PeerTimeout naming the peers that did not complete in time."""
        peers = sorted(set(peers) - {self.uid})
        deadline = time.monotonic() + timeout
        for p in peers:
            self.hello(p)
        with self._hs:
            while True:
                refused = [p for p in peers if p in self._refused]
                if refused:
                    p = refused[0]
                    raise CommError(f"node {self.uid}: node {p} at {self.mapping.control_address(p)} refused the "
                                    f"handshake: {self._refused[p]}")
                missing = [p for p in peers if p not in self._auth_rid or p not in self._ready_from]
                if not missing:
                    return
                now = time.monotonic()
                if now >= deadline:
                    detail = "; ".join(
                        f"node {p}: " + ("no answer" if p not in self._auth_rid else "did not confirm this node")
                        for p in missing[:8])
                    raise PeerTimeout(missing, "HELLO", timeout, self.uid, detail=detail)
                stale = [p for p in missing if p not in self._auth_rid
                         and now - self._challenged.get(p, 0.0) >= HELLO_RESEND]
                if stale:
                    self._hs.release()
                    try:
                        for p in stale:
                            self.hello(p)
                    finally:
                        self._hs.acquire()
                    continue
                self._hs.wait(min(0.25, deadline - now))

    def gone(self, peer: int) -> float | None:
        """Seconds since this node's connection to `peer` closed (its process is gone or
        restarting); None while it is connected or was never."""
        since = self._down.get(peer)
        return None if since is None else time.monotonic() - since

    def peer_rounds(self) -> dict[int, tuple[int, float]]:
        """(round, seconds per round lately) of each authenticated peer when it answered this
        node's HELLO."""
        with self._hs:
            return {p: r for p, r in self._peer_rounds.items() if p in self._auth_rid}

    def authenticated(self) -> dict[int, bool]:
        """Each peer authenticated so far → whether it also authenticated this node."""
        with self._hs:
            return {p: p in self._ready_from for p in self._auth_rid}

    def _on_handshake(self, rid: bytes, kind: bytes, body: memoryview, user_id: str | None) -> None:
        try:
            head, _ = decode_header(body)
        except CodecError as e:
            raise BadFrame(f"malformed {kind.decode()} frame", str(e)) from None
        peer = _field(head, "uid", int)
        if peer == self.uid or not 0 <= peer < self.mapping.num_nodes:
            raise BadFrame(f"{kind.decode()} claiming a node that is not a peer of this run", f"node {peer}")
        if self.keys and user_id != str(peer):
            raise BadFrame("frame whose CURVE key is not its node's",
                           f"{kind.decode()} claiming node {peer}, authenticated as {user_id or 'no node'!r}")
        if kind == HELLO:
            self._on_hello(peer, head)
        elif kind == ACK:
            self._on_ack(rid, peer, _field(head, "nonce", str))
            r, pace = head.get("round"), head.get("pace")
            if isinstance(r, int) and not isinstance(r, bool):
                pace = float(pace) if isinstance(pace, (int, float)) and 0 <= pace < 1e6 else 0.0
                with self._hs:
                    self._peer_rounds[peer] = (r, pace)
        elif kind == READY:
            with self._hs:
                if self._auth_rid.get(peer) == rid:
                    self._ready_from.add(peer)
                    self._hs.notify_all()
                elif len(self._pending_ready) < 4 * self.mapping.num_nodes:
                    self._pending_ready[rid] = peer
                else:
                    raise BadFrame("READY on an unauthenticated connection (too many pending)", f"node {peer}")
        elif kind == REFUSE:
            nonce = _field(head, "nonce", str)
            with self._hs:
                if nonce not in self._nonces.get(peer, ()):
                    raise BadFrame("REFUSE with a nonce this node never sent", f"claiming node {peer}")
                self._refused[peer] = str(head.get("reason"))[:500]
                self._hs.notify_all()

    def _on_hello(self, peer: int, head: Mapping[str, Any]) -> None:
        nonce = _field(head, "nonce", str)
        session = _field(head, "session", str)
        if len(nonce) > 64 or len(session) > 64:
            raise BadFrame("HELLO with an oversized nonce or session", f"claiming node {peer}")
        run, config = head.get("run"), head.get("config")
        if (run, config) != (self.identity["run"], self.identity["config"]):
            why = ("it belongs to run " + repr(self.identity["run"]) if run != self.identity["run"]
                   else "its configuration differs (config hash " + str(self.identity["config"])[:12] + ")")
            reason = (f"node {self.uid} at {self.mapping.control_address(self.uid)} {why}; the HELLO came from "
                      f"run {str(run)[:80]!r} with config hash {str(config)[:12]}")
            self.dropped("HELLO of another run or configuration", reason)
            self.send(peer, REFUSE, encode({"uid": self.uid, "nonce": nonce, "reason": reason, **self.identity}),
                      block=False)
            return
        round_, pace = self.round_of()
        self.send(peer, ACK, encode({"uid": self.uid, "nonce": nonce, "round": round_, "pace": pace}), block=False)
        with self._hs:
            new_session = self._sessions.get(peer) != session
            recent = time.monotonic() - self._challenged.get(peer, 0.0) < CHALLENGE_INTERVAL
            if new_session:
                self._sessions[peer] = session
        if new_session and not recent:  # a peer that (re)started: authenticate its connection again
            self.hello(peer, block=False)

    def _on_ack(self, rid: bytes, peer: int, nonce: str) -> None:
        with self._hs:
            nonces = self._nonces.get(peer, [])
            if nonce not in nonces:
                raise BadFrame("ACK with a nonce this node never sent", f"claiming node {peer}")
            nonces.remove(nonce)
            old = self._auth_rid.get(peer)
            if old is not None and old != rid:
                self._rid_uid.pop(old, None)
            self._auth_rid[peer] = rid
            self._rid_uid[rid] = peer
            if self._pending_ready.pop(rid, None) == peer:
                self._ready_from.add(peer)
            self._hs.notify_all()
        log.debug("node %d: node %d authenticated", self.uid, peer)
        self.send(peer, READY, encode({"uid": self.uid}), block=False)

    # receiving -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the receive thread died: nothing would arrive any more
            if not self._stop.is_set():
                self.on_failure(e, "control-plane receive thread")

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        watched: set = set()
        while not self._stop.is_set():
            if self._monitors_changed:
                with self._dealers_lock:
                    self._monitors_changed = False
                    for monitor in set(self._dealer_monitors) - watched:
                        poller.register(monitor, zmq.POLLIN)
                        watched.add(monitor)
            try:
                ready = dict(poller.poll(self.POLL_MS))
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                raise
            if ready.get(self._monitor):
                self._on_monitor_event()
            for monitor in watched:
                if ready.get(monitor):
                    self._on_dealer_event(monitor)
            if not ready.get(self._router):
                continue
            for _ in range(256):  # drain, then look at the monitor and the stop flag again
                try:
                    frames = self._router.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    if self._stop.is_set():
                        return
                    raise
                self._on_frames(frames)

    def _on_monitor_event(self) -> None:
        try:
            event = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError):
            return
        what = event["event"]
        if what == zmq.EVENT_DISCONNECTED:
            with self._hs:
                expected = self._goodbyes > 0 or self._closing
                if expected:
                    self._goodbyes -= 1
            if not expected:
                self.dropped("connection dropped (a frame over max_message_bytes, broken framing, or a peer "
                             "that went away)")
        else:
            self.dropped("connection refused in its handshake (not ZeroMQ, or a key not of this run)")

    def _on_dealer_event(self, monitor) -> None:
        try:
            event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError):
            return
        peer = self._dealer_monitors.get(monitor)
        if peer is None:
            return
        if event["event"] == zmq.EVENT_CONNECTED:
            self._down.pop(peer, None)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            self._down.setdefault(peer, time.monotonic())
            log.debug("node %d: connection to node %d closed", self.uid, peer)
            self.on_peer_down(peer)

    def _on_frames(self, frames: list) -> None:
        if len(frames) != 3:
            self.dropped(f"frame with {len(frames) - 1} parts instead of 2")
            return
        rid_frame, kind_frame, body_frame = frames
        rid, kind, body = bytes(rid_frame.buffer), bytes(kind_frame.buffer)[:16], body_frame.buffer
        n = len(kind_frame.buffer) + len(body)
        self.count_received(n)
        if kind in HANDSHAKE:
            try:
                self._on_handshake(rid, kind, body, kind_frame.get("User-Id") if self.keys else None)
            except BadFrame as e:
                self.dropped(e.reason, e.detail[:200])
            except CommError as e:  # our answer could not be sent: the peer's problem, not ours
                self.dropped("handshake answer not sent", str(e)[:200])
            return
        sender = self._rid_uid.get(rid)
        if sender is None:
            self.dropped("frame from a connection that is not an authenticated node", f"kind {kind!r}")
            return
        if self.keys and kind_frame.get("User-Id") != str(sender):
            self.dropped("frame whose CURVE key is not its node's",
                         f"node {sender}, authenticated as {kind_frame.get('User-Id') or 'no node'!r}")
            return
        self.down.consume(n)
        if kind == BYE:
            with self._hs:
                self._goodbyes += 1
        where = f"control-plane handler for a {kind.decode(errors='replace')!r} frame from node {sender}"
        try:
            self.on_frame(sender, kind, body)
        except BadFrame as e:
            self.dropped(e.reason, f"from node {sender}: {e.detail}"[:200])
        except CodecError as e:
            self.dropped(f"malformed {kind.decode(errors='replace')} frame", f"from node {sender}: {e}"[:200])
        except Exception as e:  # a bug, not bad input: the node must fail with it
            self.on_failure(e, where)

    def close(self, linger_ms: int = 2000, gone: Iterable[int] = ()) -> None:
        """Stop receiving and close the sockets; frames still queued for a peer get up to
        `linger_ms` to leave, except to the peers in `gone`, which nobody is listening for."""
        gone = set(gone)
        self._closing = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.POLL_MS / 1000 + 5)
        with self._dealers_lock:
            for peer, s in self._dealers.items():
                s.disable_monitor()
                s.setsockopt(zmq.LINGER, 0 if peer in gone else linger_ms)
                s.close()
            for monitor in self._dealer_monitors:
                monitor.close(linger=0)
            self._dealers.clear()
            self._dealer_monitors.clear()
        self.dropped.flush()
        self._teardown_sockets()


class ZmqTransport(Transport):
    """Transport whose payloads travel inline on the control plane: the `tcp` transport.

    Subclasses override `publish` for other data planes and `handle_frame` for their
    own frame kinds, and call `deliver` with each complete message. `identity` (run id
    and config hash) is checked in the handshake: a peer of another run is refused.
    """

    name = "tcp"

    def __init__(self, uid: int, mapping, cfg):
        super().__init__(uid, mapping, cfg)
        self.identity: dict[str, Any] = {}  # run id and config hash, set before `start`
        self.shared = None  # the process's shared parts (`communication.shared`), set before `start`
        self.control: ControlPlane | None = None
        self.mailbox = Mailbox(cfg.max_queue)
        self._round = 0  # the node's round (`advance`), stamped on what it publishes
        self._pace = 0.0  # seconds per round lately (a moving average)
        self._entered = 0.0
        self._bye: set[int] = set()
        self._peers: set[int] = set()
        self._state = threading.Condition()
        self._closed = False
        self._payload = [0, 0]  # tensor bytes sent, received inline on the control plane
        self._payload_lock = threading.Lock()

    def count_payload(self, sent: int = 0, received: int = 0) -> None:
        with self._payload_lock:
            self._payload[0] += sent
            self._payload[1] += received

    # lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        keys = None
        if self.cfg.curve_keys:
            keys = CurveKeys(self.cfg.curve_keys, self.uid, range(self.mapping.num_nodes))
        self.control = ControlPlane(
            self.uid, self.mapping, self._on_frame, self.cfg.upload_limit, self.cfg.download_limit, keys,
            identity=self.identity, max_message_bytes=self.cfg.max_message_bytes, max_queue=self.cfg.max_queue,
            send_timeout=self.cfg.timeout, dropped=self.dropped, on_failure=self.fail,
            round_of=lambda: (self._round, self._pace),
            on_peer_down=lambda peer: self.mailbox.wake(), shared=self.shared,
        )
        self.control.start()

    def connect(self, peers: Iterable[int], timeout: float | None = None) -> None:
        peers = set(peers) - {self.uid}
        self._peers |= peers
        t0 = time.monotonic()
        self.control.handshake(peers, timeout or self.cfg.hello_timeout)
        log.debug("node %d: handshake with %d peers done in %.3f s", self.uid, len(peers), time.monotonic() - t0)

    def close(self, timeout: float | None = None) -> None:
        if self._closed or self.control is None:
            return
        self._closed = True
        bye = encode({"uid": self.uid})
        for p in sorted(self._peers):
            try:
                self.control.send(p, BYE, bye)
            except CommError as e:
                log.warning("%s", e)
        try:
            self._wait_for(self._bye, self._peers, "BYE", timeout if timeout is not None else self.cfg.timeout)
        except PeerTimeout as e:
            log.warning("%s", e)
        self.control.close(gone=self._peers - self._bye)

    def _wait_for(self, got: set[int], peers: set[int], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._state:
            while not peers <= got:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeout(sorted(peers - got), what, timeout, self.uid)
                self._state.wait(left)

    # sending ---------------------------------------------------------------------
    def publish(
        self,
        key: str,
        tensors: Mapping[str, torch.Tensor],
        to: Sequence[int],
        header: Mapping[str, Any] | None = None,
        persistent: bool = False,
        concurrent: bool = False,
    ) -> None:
        body = encode(self.wire_head(key, header, **({"r": None} if persistent else {})), tensors)
        for peer in to:
            self.control.send(peer, DATA, body)
        self.count_payload(sent=tensor_bytes(tensors) * len(to))
        self.count_path("inline")
        log.debug("node %d: published %r inline (%d bytes) to %s", self.uid, key, len(body), list(to))

    def wire_head(self, key: str, header: Mapping[str, Any] | None, **more: Any) -> dict[str, Any]:
        """The JSON head of a published payload: key, the caller's header, this node's round."""
        return {"key": key, "h": dict(header or {}), "r": self._round, **more}

    def advance(self, round_: int) -> None:
        """Enter `round_`: messages of earlier rounds are dropped from the mailbox (and refused
        when they arrive later)."""
        now = time.monotonic()
        if self._entered and round_ > self._round:
            step = (now - self._entered) / (round_ - self._round)
            self._pace = step if not self._pace else 0.8 * self._pace + 0.2 * step
        self._round, self._entered = round_, now
        dropped = self.mailbox.expire(round_)
        for _ in range(dropped):
            self.dropped("message of a round already past")

    def peer_rounds(self) -> dict[int, int]:
        return self.control.peer_rounds() if self.control else {}

    def interrupt(self, error: BaseException) -> None:
        self.mailbox.interrupt(error)
        with self._state:
            self._state.notify_all()

    # receiving -------------------------------------------------------------------
    def _on_frame(self, sender: int, kind: bytes, body: memoryview) -> None:
        if kind == DATA:
            self._on_data(sender, body)
        elif kind == BYE:
            with self._state:
                self._bye.add(sender)
                self._state.notify_all()
        else:
            self.handle_frame(sender, kind, body)

    def _on_data(self, sender: int, body: memoryview) -> None:
        head, offset = decode_header(body)  # CodecError: dropped by the control plane
        key = _field(head, "key", str)
        header = head.get("h") or {}
        if not isinstance(header, dict):
            raise BadFrame("DATA frame whose header is not a JSON object", repr(key)[:80])
        limit = self.payload_limit(key)
        if len(body) - offset > limit:
            self.reject(Message(sender, key, header, round=wire_round(head)),
                        "payload larger than expected", f"{len(body) - offset} bytes, at most {limit}")
            return
        try:
            _, tensors = decode(body)
        except CodecError as e:
            self.reject(Message(sender, key, header, round=wire_round(head)), "malformed tensor payload", str(e))
            return
        self.count_payload(received=tensor_bytes(tensors))
        self.deliver(Message(sender, key, header, tensors, len(body), round=wire_round(head)))

    def handle_frame(self, sender: int, kind: bytes, body: memoryview) -> None:
        """Frames of kinds this class does not know; subclasses extend (raise BadFrame for
        malformed input)."""
        raise BadFrame("frame of an unknown kind", repr(kind[:16]))

    def reject(self, message: Message, reason: str, detail: str) -> None:
        """Refuse `message`'s payload: count it, log it (rate-limited) and deliver the refusal,
        so that a receive of its key raises PayloadRejected at once."""
        text = f"payload {message.key!r} from node {message.sender} rejected: {reason} ({detail})"
        self.rejections(reason, f"{message.key!r} from node {message.sender}: {detail}")
        self.deliver(Message(message.sender, message.key, message.header, error=text, rejected=True,
                             round=message.round))

    def deliver(self, message: Message) -> None:
        """Hand a complete message to whoever receives it (dropped and counted when it is a
        duplicate, of a round already past, or the mailbox is full)."""
        reason = self.mailbox.put(message)
        if reason is not None:
            self.dropped(reason, f"{message.key!r} from node {message.sender}")

    def receive(
        self,
        key: str,
        sender: int,
        timeout: float | None = None,
        expect: Mapping[str, tuple[Sequence[int], str]] | None = None,
    ) -> Message:
        timeout = self.cfg.timeout if timeout is None else timeout
        t0 = time.monotonic()

        def gone() -> BaseException | None:  # the sender's process is gone: its message will not come
            closed = self.control.gone(sender) if self.control else None
            if closed is None or closed < GONE_GRACE or self.in_flight(key, sender):
                return None
            return PeerGone(sender, key, time.monotonic() - t0, self.uid,
                            detail=f"its connection closed {closed:.1f} s ago: the node is gone")

        m = self.mailbox.take(lambda m: m.key == key and m.sender == sender, timeout, gone)
        if m is None:
            raise PeerTimeout(sender, key, timeout, self.uid, detail=self.timeout_detail(key, sender))
        if m.error is not None:
            raise (PayloadRejected if m.rejected else CommError)(m.error)
        if expect is not None:
            try:
                check_payload(m, expect)
            except PayloadRejected as e:
                self.rejections("tensors other than expected", str(e))
                raise
            try:
                check_finite(m)
            except PayloadRejected as e:
                self.rejections("non-finite values", str(e))
                raise
        log.debug("node %d: received %r from node %d", self.uid, key, sender)
        return m

    def receive_any(self, timeout: float | None = None, prefix: str = "") -> Message:
        timeout = self.cfg.timeout if timeout is None else timeout
        m = self.mailbox.take(lambda m: m.key.startswith(prefix), timeout)
        if m is None:
            raise PeerTimeout(sorted(self._peers), prefix + "*", timeout, self.uid)
        if m.error is not None:
            raise (PayloadRejected if m.rejected else CommError)(m.error)
        return m

    def timeout_detail(self, key: str, sender: int) -> str:
        """What to add to a PeerTimeout for `key` from `sender` (e.g. transfer progress)."""
        return ""

    def in_flight(self, key: str, sender: int) -> bool:
        """Whether `key` from `sender` is on its way even if the sender is gone (a torrent
        its co-receivers can complete); inline messages never are."""
        return False

    @property
    def bytes_sent(self) -> int:
        return self.control.bytes_sent if self.control else 0

    @property
    def bytes_received(self) -> int:
        return self.control.bytes_received if self.control else 0

    @property
    def payload_bytes_sent(self) -> int:
        return self._payload[0]

    @property
    def payload_bytes_received(self) -> int:
        return self._payload[1]
