import itertools
import os
import socket

import pytest

# Port ranges by test module so concurrent test runs on one host don't collide.
_next_port = itertools.count(int(os.environ.get("DFLSPLIT_TEST_BASE_PORT", "24000")), 40)


def _range_free(start: int, count: int) -> bool:
    for port in range(start, start + count):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@pytest.fixture
def base_port():
    """A base port with 40 free ports above it (20 nodes' worth)."""
    for _ in range(200):
        port = next(_next_port)
        if _range_free(port, 40):
            return port
    raise RuntimeError("no free port range found")
