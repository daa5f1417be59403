"""Turn off Nagle's algorithm on libtorrent's peer sockets (Linux; best effort).

libtorrent does not set TCP_NODELAY on its BitTorrent connections. On loopback, where
the segment size is 64 KiB, every 16 KiB block is a "small" segment: Nagle's algorithm
holds the next one until the previous one is acknowledged, and the receiver delays that
acknowledgement by 40 ms when nothing else is in flight, so the tail of a transfer
sometimes stalls for 40 ms. libtorrent offers no setting for it and the Python bindings
no access to its sockets, so `set_nodelay` finds them among this process's open file
descriptors (``/proc/self/fd``) and sets the option on the ones that match.
"""

from __future__ import annotations

import os
import socket
from typing import Callable

_FD_DIR = "/proc/self/fd"
SUPPORTED = os.path.isdir(_FD_DIR) and hasattr(socket, "TCP_NODELAY")


def set_nodelay(match: Callable[[tuple, tuple], bool], seen: set[str] | None = None) -> int:
    """Set TCP_NODELAY on every connected TCP socket of this process for which
    ``match(local_address, peer_address)`` is true and that lacks it; returns how many.

    `seen` (kept by the caller between calls) holds the sockets already settled, which
    are skipped; it is pruned to the sockets still open. Each descriptor is duplicated
    first, so one closed or reused meanwhile is either skipped or handled like any other.
    """
    if not SUPPORTED:
        return 0
    changed = 0
    try:
        fds = os.listdir(_FD_DIR)
    except OSError:
        return 0
    open_now = set()
    for name in fds:
        try:
            target = os.readlink(f"{_FD_DIR}/{name}")
        except OSError:
            continue
        if not target.startswith("socket:"):
            continue
        open_now.add(target)
        if seen is not None and target in seen:
            continue
        try:
            dup = os.dup(int(name))
        except (OSError, ValueError):
            continue
        try:
            s = socket.socket(fileno=dup)  # family and type are read from the descriptor
        except OSError:
            os.close(dup)
            continue
        with s:
            try:
                if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
                    local, peer = s.getsockname(), s.getpeername()
                    if match(local, peer) and not s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        changed += 1
            except OSError:  # not connected yet (look again next time), or gone
                continue
        if seen is not None:
            seen.add(target)
    if seen is not None:
        seen &= open_now
    return changed
