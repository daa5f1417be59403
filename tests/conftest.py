import itertools
import os
import threading

import pytest

from dflsplit.mappings import free_base_port

# Test ports stay below Linux's ephemeral range (32768+), where outgoing connections could
# take them. Each test gets the next block; the first block is random per process so that
# concurrent test runs on one host rarely probe the same ports.
FIRST_PORT, LAST_PORT, BLOCK = 12000, 32000, 40
_blocks = itertools.count(
    int(os.environ.get("DFLSPLIT_TEST_BLOCK", os.getpid() % ((LAST_PORT - FIRST_PORT) // BLOCK)))
)


def next_base_port(nodes: int) -> int:
    """A base port with `nodes` nodes' worth of free ports above it, below 32768."""
    start = FIRST_PORT + (next(_blocks) * BLOCK) % (LAST_PORT - FIRST_PORT)
    return free_base_port(nodes, start)


@pytest.fixture
def base_port():
    """A base port with 40 free ports above it (20 nodes' worth)."""
    return next_base_port(20)


def term_context(ctx, timeout=10.0):
    """End a test's own ZeroMQ context (its hand-made stranger sockets): every socket closed
    without lingering, then terminated, in a thread. zmq_ctx_term blocks in C, where no
    test timeout reaches it; a context that does not end within `timeout` is left behind
    with a warning (it is the test's harness, not the node under test)."""
    import warnings

    ender = threading.Thread(target=ctx.destroy, kwargs={"linger": 0}, daemon=True)
    ender.start()
    ender.join(timeout)
    if ender.is_alive():
        warnings.warn(f"a test's ZeroMQ context did not terminate within {timeout:g} s", stacklevel=2)


def in_parallel(fns, timeout=60):
    """Run the callables in threads at once; re-raise the first error any of them raised."""
    errors = []

    def wrap(f):
        try:
            f()
        except Exception as e:  # pragma: no cover - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(f,)) for f in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
