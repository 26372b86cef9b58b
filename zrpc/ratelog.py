"""Logging that stays bounded whatever peers do: one line per kind per interval.

:class:`RateLimitedLog` logs a line for a key (a refusal class, a failing
operation) at most once per ``interval_s``; the next line for that key says
how many were left out in between.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most one line per ``key`` every ``interval_s``; the next says how many were dropped."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._dropped: collections.Counter[str] = collections.Counter()

    def log(self, key: str, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval_s`` ago."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._dropped[key] += 1
            return False
        if len(self._last) > 1024:  # keys are status names; bounded anyway
            self._last.clear()
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            msg += f" ({dropped} more like it not logged in the last {self.interval_s:g}s)"
        self.logger.log(level, msg, *args)
        return True
