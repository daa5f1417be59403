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
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

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


class PayloadMismatch(CommError):
    """A payload whose tensor names, shapes or dtypes are not what the receiver expects."""


@dataclass
class Message:
    """What a receiver gets: who sent it, under which key, its header and tensors."""

    sender: int
    key: str
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0
    error: str | None = None  # set when the message could not be delivered; receive raises it


class Mailbox:
    """Delivered messages waiting to be received, in arrival order."""

    def __init__(self):
        self._messages: list[Message] = []
        self._cond = threading.Condition()

    def put(self, message: Message) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    def take(self, match, timeout: float) -> Message | None:
        """Remove and return the first message for which `match(message)` is true, or None at timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, m in enumerate(self._messages):
                    if match(m):
                        return self._messages.pop(i)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

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
    ) -> None:
        """Make `tensors` available under `key` to every node in `to`."""

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
