"""Token bucket used to emulate a link's upload or download rate on the direct path."""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """Blocks callers so that at most `rate` bytes per second pass on average.

    `rate=0` means unlimited. The bucket holds at most `burst` bytes. The default, 0,
    emulates a serial link: each frame waits its own ``size / rate`` after the link
    is free, so a payload after an idle gap is not delivered faster than the rate.
    A consume larger than the bucket borrows against the future: the call returns
    when the bytes would have passed at the configured rate. `passed` counts the bytes
    that went through a limited bucket.
    """

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = float(rate)
        self.capacity = float(burst if burst is not None else 0.0)
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()
        self.passed = 0

    def consume(self, nbytes: int) -> float:
        """Take `nbytes`, sleeping as needed; returns the seconds slept."""
        if self.rate <= 0 or nbytes <= 0:
            return 0.0
        with self._lock:
            self.passed += nbytes
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
        return wait
