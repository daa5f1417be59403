"""The Communication interface: publish named tensors to several receivers, receive by key.

A transport owns one node's sockets. Headers and small payloads go over the ZeroMQ
control plane (`control.ControlPlane`); the transport decides how tensor payloads
travel (inline for `tcp`, swarmed over BitTorrent for `torrent`). Every wait has a
timeout and ends in `PeerTimeout` naming the peer and the key.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..registry import Registry
from .codec import describe

TRANSPORTS: Registry[type["Transport"]] = Registry("transport")

log = logging.getLogger(__name__)


class CommError(RuntimeError):
    """A communication failure that is not a timeout."""


class PeerTimeout(CommError, TimeoutError):
    """A peer did not deliver in time; the message names the peer and the key."""

    def __init__(
        self, peer: int | Sequence[int], key: str, timeout: float, uid: int | None = None, detail: str = ""
    ):
        who = f"node {uid}: " if uid is not None else ""
        peers = f"node {peer}" if isinstance(peer, int) else (
            "node " + ", ".join(map(str, peer)) if peer else "any peer")
        more = f" ({detail})" if detail else ""
        super().__init__(f"{who}no {key!r} from {peers} within {timeout:g} s{more}")
        self.peer, self.key, self.timeout = peer, key, timeout


class BindError(CommError):
    """A node cannot bind one of its ports (in use, or an address not of this machine)."""


class PeerGone(PeerTimeout):
    """The peer's process is gone (its connection closed) and its message had not come: no
    need to wait for the deadline."""


class PayloadRejected(CommError):
    """A payload refused on arrival: larger than its receiver expects, malformed, with other
    tensors than expected, or with NaN/inf values. The message names sender, key and reason."""


class PayloadMismatch(PayloadRejected):
    """A payload whose tensor names, shapes or dtypes are not what the receiver expects."""


class TransportFailed(CommError):
    """The transport itself broke: a frame handler raised, or a transport thread died. Every
    later wait raises it at once, with the cause, instead of ending in a timeout."""


class DropCounter:
    """Counts input dropped or rejected per reason, and logs it without flooding.

    The first drop of each reason is logged at once (with its detail); later ones are only
    counted, and at most one summary line per `interval` seconds says how many of each
    reason came since the last line. Cheap enough to call from a receive thread for every
    junk frame.
    """

    def __init__(self, logger: logging.Logger, who: str, interval: float = 10.0):
        self.log = logger
        self.who = who
        self.interval = interval
        self.total: Counter[str] = Counter()
        self._unreported: Counter[str] = Counter()
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, reason: str, detail: str = "") -> None:
        """Count one drop for `reason`; `detail` is logged only with the first of its reason."""
        with self._lock:
            first = reason not in self.total
            self.total[reason] += 1
            if not first:
                self._unreported[reason] += 1
            now = time.monotonic()
            due = bool(self._unreported) and now - self._last >= self.interval
            if due:
                summary, self._unreported = dict(self._unreported), Counter()
                self._last = now
        if first:
            self.log.warning("%s: dropped input: %s%s (further drops are counted and summarised every %g s)",
                             self.who, reason, f" ({detail})" if detail else "", self.interval)
        elif due:
            self._summarise(summary)

    def flush(self) -> None:
        """Log the drops not reported yet (call at shutdown)."""
        with self._lock:
            summary, self._unreported = dict(self._unreported), Counter()
            self._last = time.monotonic()
        if summary:
            self._summarise(summary)

    def _summarise(self, summary: dict[str, int]) -> None:
        parts = ", ".join(f"{reason} x{n}" for reason, n in sorted(summary.items()))
        self.log.warning("%s: dropped input since the last report: %s", self.who, parts)

    def counts(self) -> dict[str, int]:
        """Drops so far per reason."""
        with self._lock:
            return dict(self.total)


@dataclass
class Message:
    """What a receiver gets: who sent it, under which key, its header and tensors."""

    sender: int
    key: str
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0
    error: str | None = None  # set when the message could not be delivered; receive raises it
    rejected: bool = False  # the error is a refused payload: receive raises PayloadRejected
    round: int | None = None  # the sender's round when it published (None: not stamped)


class Mailbox:
    """Delivered messages waiting to be received, in arrival order, bounded.

    `put` refuses (returns the reason) a second message for the same (key, sender), a
    message stamped with a round before the current one (see `expire`), and any message
    once `max_messages` are waiting. `take` waits for a matching message; `interrupt`
    makes every waiting and later `take` raise the error it is given.
    """

    def __init__(self, max_messages: int = 4096):
        self.max_messages = max_messages
        self._messages: list[Message] = []
        self._seen: dict[tuple[str, int], int | None] = {}  # (key, sender) → round, until expired
        self._round = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None

    def put(self, message: Message) -> str | None:
        """Queue `message`; returns None, or why it was dropped."""
        with self._cond:
            ident = (message.key, message.sender)
            if ident in self._seen:
                return "duplicate message (same key and sender)"
            if message.round is not None and message.round < self._round:
                return "message of a round already past"
            if len(self._messages) >= self.max_messages:
                return f"mailbox full ({self.max_messages} messages waiting)"
            self._seen[ident] = message.round
            self._messages.append(message)
            self._cond.notify_all()
            return None

    def take(self, match: Callable[[Message], bool], timeout: float,
             give_up: Callable[[], BaseException | None] | None = None) -> Message | None:
        """Remove and return the first message for which `match(message)` is true, or None at
        timeout; `give_up()` (asked while none matches, at least every 0.1 s) may return an
        error to raise instead of waiting on."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                for i, m in enumerate(self._messages):
                    if match(m):
                        return self._messages.pop(i)
                if give_up is not None:
                    error = give_up()
                    if error is not None:
                        raise error
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left if give_up is None else min(left, 0.1))

    def wake(self) -> None:
        """Wake every waiting `take` to look again (e.g. a peer went away)."""
        with self._cond:
            self._cond.notify_all()

    def expire(self, round_: int) -> int:
        """Enter `round_`: drop waiting messages stamped with an earlier round, and forget the
        (key, sender) pairs of those rounds; returns how many messages were dropped."""
        with self._cond:
            self._round = round_
            keep = [m for m in self._messages if m.round is None or m.round >= round_]
            dropped = len(self._messages) - len(keep)
            self._messages = keep
            self._seen = {k: r for k, r in self._seen.items() if r is None or r >= round_}
            return dropped

    def interrupt(self, error: BaseException) -> None:
        """Make every waiting and later `take` raise `error`."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._messages)


def _shape_fits(got: tuple[int, ...], want: Sequence) -> bool:
    return len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want))


def check_payload(message: Message, expect: Mapping[str, tuple[Sequence, str]]) -> None:
    """Raise PayloadMismatch (naming sender and key) unless the tensors match `expect`:
    name → (shape, dtype name), where a ``None`` dimension may have any length."""
    got = describe(message.tensors)
    want = {k: (tuple(s), str(d).removeprefix("torch.")) for k, (s, d) in expect.items()}
    if set(got) == set(want) and all(
        got[k][1] == want[k][1] and _shape_fits(got[k][0], want[k][0]) for k in want
    ):
        return
    problems = []
    for name in sorted(set(got) | set(want)):
        if name not in got:
            problems.append(f"missing tensor {name!r}")
        elif name not in want:
            problems.append(f"unexpected tensor {name!r}")
        elif got[name][1] != want[name][1] or not _shape_fits(got[name][0], want[name][0]):
            problems.append(f"{name!r} is {got[name]}, expected {want[name]}")
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    raise PayloadMismatch(f"payload {message.key!r} from node {message.sender} rejected: {shown}")


def check_finite(message: Message) -> None:
    """Raise PayloadRejected (naming sender, key and tensor) when a floating-point tensor of
    the payload holds NaN or inf."""
    for name, t in message.tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise PayloadRejected(f"payload {message.key!r} from node {message.sender} rejected: {bad} non-finite "
                                  f"value(s) in {name!r}")


class Transport(ABC):
    """One node's end of the network.

    Lifecycle: ``start()`` binds; ``connect(peers)`` does the HELLO handshake; then any
    number of ``publish``/``receive``; ``close()`` says BYE and waits (bounded) for the
    peers' BYE so that nothing they still need disappears. Counters `bytes_sent` and
    `bytes_received` include every frame on every plane.
    """

    name = "base"

    def __init__(self, uid: int, mapping, cfg):
        self.uid = uid
        self.mapping = mapping
        self.cfg = cfg
        self.dropped = DropCounter(log, f"node {uid}")  # frames and messages dropped, per reason
        self.rejections = DropCounter(log, f"node {uid}")  # payloads refused, per reason
        self.failure: TransportFailed | None = None
        self._limits: dict[str, int] = {}
        self.paths: Counter[str] = Counter()  # payloads published per path ("inline", "torrent")

    def count_path(self, path: str) -> None:
        """One payload published on `path` (inline or torrent)."""
        self.paths[path] += 1

    # failures and limits ---------------------------------------------------------
    def fail(self, cause: BaseException, where: str) -> None:
        """The transport broke in `where` (a handler, a thread): every waiting and later
        receive raises `TransportFailed` naming `where` and the cause. The first failure wins."""
        if self.failure is not None:
            return
        err = TransportFailed(f"node {self.uid}: {where} failed: {type(cause).__name__}: {cause}")
        err.__cause__ = cause
        self.failure = err
        log.error("%s", err, exc_info=(type(cause), cause, cause.__traceback__))
        self.interrupt(err)

    def interrupt(self, error: BaseException) -> None:
        """Wake every wait of this transport with `error` (subclasses with waits extend)."""

    def limit_payload(self, prefix: str, max_bytes: int) -> None:
        """Refuse payloads under keys starting with `prefix` whose size exceeds `max_bytes`
        (encoded bytes: tensor data plus headers) before they are downloaded. The longest
        matching prefix applies; keys matching none are capped at
        ``communication.max_message_bytes``."""
        self._limits[prefix] = int(max_bytes)

    def payload_limit(self, key: str) -> int:
        """The most bytes a payload under `key` may have (see `limit_payload`)."""
        best = None
        for prefix, limit in self._limits.items():
            if key.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, limit)
        return best[1] if best is not None else int(self.cfg.max_message_bytes)

    @property
    def rejected(self) -> int:
        """Payloads refused so far (too large, malformed, unexpected tensors, non-finite)."""
        return sum(self.rejections.counts().values())

    @abstractmethod
    def start(self) -> None:
        """Bind this node's sockets (error naming the node and port if one is in use)."""

    @abstractmethod
    def connect(self, peers: Iterable[int], timeout: float | None = None) -> None:
        """HELLO handshake with `peers`; PeerTimeout names the ones that did not answer."""

    @abstractmethod
    def publish(
        self,
        key: str,
        tensors: Mapping[str, torch.Tensor],
        to: Sequence[int],
        header: Mapping[str, Any] | None = None,
        persistent: bool = False,
        concurrent: bool = False,
    ) -> None:
        """Make `tensors` available under `key` to every node in `to`. The message carries
        this node's round and expires at a receiver that is past it, unless `persistent`
        (e.g. a rejoin announcement, which must be heard even late). `concurrent`: the
        receivers publish payloads of their own at the same time (a gossip round), so
        their uploads have nothing to spare for swarming."""

    @abstractmethod
    def receive(
        self,
        key: str,
        sender: int,
        timeout: float | None = None,
        expect: Mapping[str, tuple[Sequence[int], str]] | None = None,
    ) -> Message:
        """The message `key` from `sender`; checked against `expect` (name → (shape, dtype))."""

    @abstractmethod
    def receive_any(self, timeout: float | None = None, prefix: str = "") -> Message:
        """The oldest undelivered message whose key starts with `prefix`."""

    def advance(self, round_: int) -> None:
        """Tell the transport the node entered `round_` (retires old published keys)."""

    def peer_rounds(self) -> dict[int, tuple[int, float]]:
        """(round, seconds per round lately) of each peer when the handshake with it completed
        (a node that rejoins a live run starts after them)."""
        return {}

    @abstractmethod
    def close(self, timeout: float | None = None) -> None:
        """BYE to the peers, wait for theirs (bounded), release every socket and file."""

    @property
    @abstractmethod
    def bytes_sent(self) -> int: ...

    @property
    @abstractmethod
    def bytes_received(self) -> int: ...

    @property
    def payload_bytes_sent(self) -> int:
        """Bytes of tensor data sent (the rest of `bytes_sent` is metadata: headers, framing,
        torrent metadata and protocol)."""
        return 0

    @property
    def payload_bytes_received(self) -> int:
        """Bytes of tensor data received."""
        return 0

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()
