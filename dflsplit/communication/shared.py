"""What the transports of the nodes of one process share (``run.nodes_per_process``).

One ZeroMQ context (its I/O thread serves every node's sockets) with one CURVE
authenticator, and for the `torrent` transport one data plane (a libtorrent session
listening on every node's data port). Each node keeps its own sockets, mailbox and
counters. Made by the launcher in each node process; transports built without one make
their own context and plane.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import zmq


class ProcessShared:
    """The shared communication parts of the process hosting nodes `uids` (made lazily)."""

    def __init__(self, uids: Sequence[int]):
        self.uids = sorted(uids)
        self._lock = threading.Lock()
        self._ctx: zmq.Context | None = None
        self._auth: Any = None
        self._plane: Any = None

    def context(self) -> zmq.Context:
        with self._lock:
            if self._ctx is None:
                self._ctx = zmq.Context()
            return self._ctx

    def authenticator(self, keys) -> Any:
        """The context's CURVE authenticator (one per context), started on first use."""
        ctx = self.context()
        with self._lock:
            if self._auth is None:
                self._auth = keys.start_authenticator(ctx)
            return self._auth

    def data_plane(self, cfg, mapping) -> Any:
        """The process's torrent data plane."""
        from .torrent import DataPlane

        with self._lock:
            if self._plane is None:
                self._plane = DataPlane(cfg, mapping, self.uids)
            return self._plane

    def close(self) -> None:
        """After every transport closed: stop the authenticator and the context."""
        with self._lock:
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None
