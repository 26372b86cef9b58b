"""Give freed native memory back to the OS: glibc allocator settings and ``malloc_trim``.

A server that accepts and closes many TLS connections frees most of what each
one allocated (OpenSSL's per-connection state, uvloop's read buffers, frame
decoder buffers), but glibc keeps the freed memory in its heap: pages in the
middle of the heap stay resident while a live object sits above them, and
after a large buffer allocated with ``mmap`` is freed glibc raises its mmap
threshold, so the next buffers of that size come from the heap too. RSS then
ratchets up with connection churn although the Python heap is flat
(docs/performance.md, "Memory under connection churn", has the measurements
and a reproduction).

:func:`tune_allocator` pins the mmap threshold (large buffers are mapped and
unmapped, never left in the heap); :class:`Trimmer` calls ``malloc_trim(0)``
(which also returns free pages from the middle of the heap) at most once per
``interval`` seconds, and only after connections closed. Both are no-ops
where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from typing import Any

__all__ = ["MMAP_THRESHOLD", "Trimmer", "tune_allocator"]

log = logging.getLogger("zrpc.memory")

#: Allocations of at least this many bytes are mapped on their own (glibc M_MMAP_THRESHOLD).
MMAP_THRESHOLD = 64 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def tune_allocator() -> bool:
    """Pin glibc's mmap threshold (and the heap's trim threshold); False if not glibc."""
    if _LIBC is None:
        return False
    ok = _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD) == 1 and ok
    return ok


class Trimmer:
    """``malloc_trim(0)`` after connections closed, at most once per ``interval`` seconds.

    A closed connection's buffers are freed a little after the close is
    noticed (a closing TLS transport may linger up to ``CLOSE_LINGER_S``), so
    every close keeps trimming on for the next ``rounds`` ticks.
    """

    def __init__(self, interval: float = 1.0, rounds: int = 5) -> None:
        self.interval = interval
        self.rounds = rounds
        self.pending = 0
        self.trims = 0
        self._last = 0.0

    def closed(self) -> None:
        """A connection (or another large owner of native memory) went away."""
        self.pending = self.rounds

    def tick(self) -> None:
        """Call periodically (the broker's heartbeat): trims while closes are recent."""
        if not self.pending or _LIBC is None:
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        self.pending -= 1
        _LIBC.malloc_trim(0)
        self.trims += 1
