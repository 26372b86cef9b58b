"""One exponential backoff policy: client reconnects and the broker's worker restarts use it."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between attempts.

    The n-th consecutive failed attempt waits ``min(maximum, initial * multiplier**(n-1))``
    seconds, spread by +/- ``jitter`` (a fraction). ``max_attempts`` consecutive
    failures (None: never) make a caller give up and raise the last error (a chat
    subscription restarts the count whenever a resumed stream delivers an event).
    """

    initial: float = 0.05
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int | None = None

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.multiplier ** max(0, attempt - 1))
        if self.jitter:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, base)
