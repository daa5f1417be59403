"""ZeroMQ control plane, and the transport that carries every payload on it (`tcp`).

Each node binds one ROUTER socket on its control port and opens one DEALER socket per
peer whose identity is the node's uid, so a receiver knows who sent each frame and
drops frames from ids outside the run. A background thread receives; sends are
serialised per peer socket. A frame is ``[kind, body]`` where body is a codec message.

Kinds: HELLO/ACK (handshake), BYE (shutdown), DATA (header + tensors). Subclasses add
their own kinds through `handle_frame`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import zmq

from .base import BindError, CommError, Mailbox, Message, PayloadRejected, PeerTimeout, Transport, check_payload
from .codec import CodecError, decode, decode_header, encode, tensor_bytes
from .keys import CurveKeys
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

HELLO, ACK, BYE, DATA = b"HELLO", b"ACK", b"BYE", b"DATA"


def wire_round(head: Mapping[str, Any]) -> int | None:
    """The publisher's round stamped in a payload's head (None when absent or not an int)."""
    r = head.get("r")
    return r if isinstance(r, int) and not isinstance(r, bool) else None


class ControlPlane:
    """One node's ZeroMQ sockets: a ROUTER to receive, a DEALER per peer to send."""

    POLL_MS = 50

    def __init__(
        self,
        uid: int,
        mapping,
        on_frame: Callable[[int, bytes, memoryview], None],
        upload_limit: int = 0,
        download_limit: int = 0,
        keys: CurveKeys | None = None,
    ):
        self.uid = uid
        self.keys = keys
        self.mapping = mapping
        self.on_frame = on_frame
        self.up = TokenBucket(upload_limit)
        self.down = TokenBucket(download_limit)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._ctx = zmq.Context()
        self._auth = keys.start_authenticator(self._ctx) if keys else None
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVHWM, 0)
        if keys:
            keys.secure_server(self._router)
        address = f"tcp://{mapping.host(uid)}:{mapping.control_port(uid)}"
        try:
            self._router.bind(address)
        except zmq.ZMQError as e:
            self._router.close()
            if self._auth:
                self._auth.stop()
            self._ctx.term()
            raise BindError(
                f"node {uid}: cannot bind control port {mapping.control_port(uid)} on "
                f"{mapping.host(uid)} ({e}); choose another run.base_port"
            ) from None
        self._dealers: dict[int, zmq.Socket] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._dealers_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"control-{uid}", daemon=True)

    def start(self) -> None:
        """Start receiving (call once whoever handles frames is ready for them)."""
        self._thread.start()

    def _dealer(self, peer: int) -> tuple[zmq.Socket, threading.Lock]:
        with self._dealers_lock:
            if peer not in self._dealers:
                self.mapping.machine_rank(peer)  # raises for ids outside the run
                s = self._ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.IDENTITY, str(self.uid).encode())
                s.setsockopt(zmq.SNDHWM, 0)
                s.setsockopt(zmq.LINGER, 5000)
                if self.keys:
                    self.keys.secure_client(s, peer)
                s.connect(self.mapping.control_address(peer))
                self._dealers[peer] = s
                self._locks[peer] = threading.Lock()
            return self._dealers[peer], self._locks[peer]

    def send(self, peer: int, kind: bytes, body: bytes) -> None:
        """Queue one frame to `peer` (after the upload token bucket lets it pass)."""
        n = len(kind) + len(body)
        self.up.consume(n)
        sock, lock = self._dealer(peer)
        with lock:
            sock.send_multipart([kind, body], copy=len(body) < 65536)
        with self._count_lock:
            self.bytes_sent += n

    def count_received(self, n: int) -> None:
        with self._count_lock:
            self.bytes_received += n

    def count_sent(self, n: int) -> None:
        with self._count_lock:
            self.bytes_sent += n

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(self.POLL_MS):
                    continue
                frames = self._router.recv_multipart(copy=False)
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                raise
            if len(frames) != 3:
                log.warning("node %d: dropped a frame with %d parts", self.uid, len(frames))
                continue
            ident, kind, body = frames
            try:
                sender = int(bytes(ident.buffer))
                self.mapping.machine_rank(sender)
            except ValueError:  # MappingError is a ValueError
                log.warning("node %d: dropped a frame from unknown id %r", self.uid, bytes(ident.buffer)[:32])
                continue
            if self.keys and kind.get("User-Id") != str(sender):
                log.warning(
                    "node %d: dropped a frame claiming to be node %d, authenticated as %r",
                    self.uid, sender, kind.get("User-Id") or "no node",
                )
                continue
            n = len(kind.buffer) + len(body.buffer)
            self.down.consume(n)
            self.count_received(n)
            try:
                self.on_frame(sender, bytes(kind.buffer), body.buffer)
            except Exception:  # a bad frame must not kill the receiver thread
                log.exception("node %d: error handling a %r frame from node %d", self.uid, bytes(kind.buffer), sender)

    def close(self, linger_ms: int = 2000, gone: Iterable[int] = ()) -> None:
        """Stop receiving and close the sockets; frames still queued for a peer get up to
        `linger_ms` to leave, except to the peers in `gone`, which nobody is listening for."""
        gone = set(gone)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.POLL_MS / 1000 + 5)
        with self._dealers_lock:
            for peer, s in self._dealers.items():
                s.setsockopt(zmq.LINGER, 0 if peer in gone else linger_ms)
                s.close()
            self._dealers.clear()
        self._router.close()
        if self._auth:
            self._auth.stop()
        self._ctx.term()


class ZmqTransport(Transport):
    """Transport whose payloads travel inline on the control plane: the `tcp` transport.

    Subclasses override `publish` for other data planes and `handle_frame` for their
    own frame kinds, and call `deliver` with each complete message.
    """

    name = "tcp"

    def __init__(self, uid: int, mapping, cfg):
        super().__init__(uid, mapping, cfg)
        self.control: ControlPlane | None = None
        self.mailbox = Mailbox(cfg.max_queue)
        self._round = 0  # the node's round (`advance`), stamped on what it publishes
        self._acked: set[int] = set()
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
            self.uid, self.mapping, self._on_frame, self.cfg.upload_limit, self.cfg.download_limit, keys
        )
        self.control.start()

    def connect(self, peers: Iterable[int], timeout: float | None = None) -> None:
        peers = set(peers) - {self.uid}
        self._peers |= peers
        hello = encode({"uid": self.uid})
        for p in sorted(peers):
            self.control.send(p, HELLO, hello)
        self._wait_for(self._acked, peers, "HELLO", timeout or self.cfg.hello_timeout)

    def close(self, timeout: float | None = None) -> None:
        if self._closed or self.control is None:
            return
        self._closed = True
        bye = encode({"uid": self.uid})
        for p in sorted(self._peers):
            self.control.send(p, BYE, bye)
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
    ) -> None:
        body = encode(self.wire_head(key, header), tensors)
        for peer in to:
            self.control.send(peer, DATA, body)
        self.count_payload(sent=tensor_bytes(tensors) * len(to))

    def wire_head(self, key: str, header: Mapping[str, Any] | None, **more: Any) -> dict[str, Any]:
        """The JSON head of a published payload: key, the caller's header, this node's round."""
        return {"key": key, "h": dict(header or {}), "r": self._round, **more}

    def advance(self, round_: int) -> None:
        """Enter `round_`: messages of earlier rounds are dropped from the mailbox (and refused
        when they arrive later)."""
        self._round = round_
        dropped = self.mailbox.expire(round_)
        for _ in range(dropped):
            self.dropped("message of a round already past")

    def interrupt(self, error: BaseException) -> None:
        self.mailbox.interrupt(error)

    # receiving -------------------------------------------------------------------
    def _on_frame(self, sender: int, kind: bytes, body: memoryview) -> None:
        if kind == DATA:
            try:
                head, tensors = decode(body)
            except CodecError as e:
                log.warning("node %d: malformed DATA frame from node %d: %s", self.uid, sender, e)
                return
            self.count_payload(received=tensor_bytes(tensors))
            self.deliver(Message(sender, str(head.get("key")), head.get("h") or {}, tensors, len(body),
                                 round=wire_round(head)))
        elif kind == HELLO:
            self.control.send(sender, ACK, encode({"uid": self.uid}))
        elif kind in (ACK, BYE):
            with self._state:
                (self._acked if kind == ACK else self._bye).add(sender)
                self._state.notify_all()
        else:
            self.handle_frame(sender, kind, body)

    def handle_frame(self, sender: int, kind: bytes, body: memoryview) -> None:
        """Frames of kinds this class does not know; subclasses extend."""
        try:
            head, _ = decode_header(body)
        except CodecError:
            head = {}
        log.warning("node %d: dropped unknown frame kind %r from node %d (%s)", self.uid, kind, sender, head)

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
        m = self.mailbox.take(lambda m: m.key == key and m.sender == sender, timeout)
        if m is None:
            raise PeerTimeout(sender, key, timeout, self.uid, detail=self.timeout_detail(key, sender))
        if m.error is not None:
            raise (PayloadRejected if m.rejected else CommError)(m.error)
        if expect is not None:
            check_payload(m, expect)
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
