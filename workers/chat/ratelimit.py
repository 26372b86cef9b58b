"""Per-user token buckets for the chat service's message rate limit.

Each key (a user) has a bucket of ``burst`` tokens refilled at ``rate`` per
second; a message takes one. :meth:`RateLimiter.try_take` refuses when the
bucket is empty (the caller answers RESOURCE_EXHAUSTED with the wait);
:meth:`RateLimiter.reserve` always takes one, possibly going into debt, and
returns how long the caller must wait before using it (streams are paced
that way). Full buckets are indistinguishable from absent ones, so the table
is swept of them when it grows: memory is bounded by the users active in the
last ``burst / rate`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """Token buckets keyed by user (see the module docstring)."""

    __slots__ = ("_buckets", "_clock", "_sweep_at", "burst", "rate")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 sweep_at: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._sweep_at = sweep_at

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.burst)
        tokens, at = entry
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def _store(self, key: str, tokens: float, now: float) -> None:
        if key not in self._buckets and len(self._buckets) >= self._sweep_at:
            self._sweep(now)
        self._buckets[key] = (tokens, now)

    def _sweep(self, now: float) -> None:
        full = [k for k in self._buckets if self._tokens(k, now) >= self.burst]
        for k in full:
            del self._buckets[k]
        self._sweep_at = max(self._sweep_at, 2 * len(self._buckets))

    def try_take(self, key: str) -> float:
        """Take a token: 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens >= 1:
            self._store(key, tokens - 1, now)
            return 0.0
        return (1 - tokens) / self.rate

    def reserve(self, key: str) -> float:
        """Take a token now (possibly on credit); returns the seconds to wait before using it."""
        now = self._clock()
        tokens = self._tokens(key, now) - 1
        self._store(key, tokens, now)
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def refund(self, key: str) -> None:
        """Give back a token taken by :meth:`reserve` and not used."""
        now = self._clock()
        self._store(key, min(float(self.burst), self._tokens(key, now) + 1), now)

    def __len__(self) -> int:
        return len(self._buckets)
