"""What the broker says about its traffic: a periodic INFO summary and rate-limited refusals.

* Every connection's open and close is logged at DEBUG (peer, and the reason
  it ended).
* Every ``interval_s`` seconds (``--log-summary-interval``; 0 turns it off)
  one INFO line sums up the period, when anything happened in it::

      activity: connections=12 (+5 -3), calls=840, errors UNAVAILABLE=2 RESOURCE_EXHAUSTED=1

* A refusal (a connection closed for a bad token, an oversized or malformed
  frame, a handshake timeout; a call refused for authentication, permission
  or a limit) is logged at INFO with its reason, at most once per
  ``refusal_interval_s`` per class (status); the next line of that class
  says how many were not logged in between. Logging is bounded whatever
  clients do.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from zrpc.ratelog import RateLimitedLog
from zrpc.status import Status

__all__ = ["CALL_REFUSALS", "CONNECTION_REFUSALS", "Activity"]

#: Statuses that, ending a connection, mean the broker refused it (not a normal close).
CONNECTION_REFUSALS = frozenset({Status.UNAUTHENTICATED, Status.PERMISSION_DENIED,
                                 Status.RESOURCE_EXHAUSTED, Status.INTERNAL, Status.DEADLINE_EXCEEDED,
                                 Status.INVALID_ARGUMENT})
#: Call statuses logged as refusals.
CALL_REFUSALS = frozenset({Status.UNAUTHENTICATED, Status.PERMISSION_DENIED, Status.RESOURCE_EXHAUSTED})


class Activity:
    """Counts for the summary line, and the refusal log (see module docstring)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 refusal_interval_s: float = 10.0) -> None:
        self.log = logger
        self.interval_s = interval_s
        self.refusals = RateLimitedLog(logger, refusal_interval_s)
        self.opened = 0
        self.closed = 0
        self.calls = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def connection_opened(self, peer: str | None) -> None:
        self.opened += 1
        self.log.debug("connection from %s opened", peer)

    def connection_closed(self, peer: str | None, status: Status, reason: str) -> None:
        self.closed += 1
        self.log.debug("connection from %s closed: %s: %s", peer, status.name, reason)
        if status in CONNECTION_REFUSALS:
            self.refusals.log(f"connection {status.name}", logging.INFO,
                              "refused connection from %s: %s: %s", peer, status.name, reason)

    def call_done(self, method: str, status: Status, reason: str = "") -> None:
        self.calls += 1
        if status is not Status.OK:
            self.errors[status.name] += 1
        if status in CALL_REFUSALS:
            self.refusals.log(f"call {status.name}", logging.INFO, "refused call %s: %s%s",
                              method, status.name, f": {reason}" if reason else "")

    def summary(self, connections: int) -> str | None:
        """The period's line (None when nothing happened); starts the next period."""
        if not (self.opened or self.closed or self.calls):
            return None
        errors = " ".join(f"{name}={n}" for name, n in self.errors.most_common())
        line = (f"activity: connections={connections} (+{self.opened} -{self.closed}), "
                f"calls={self.calls}" + (f", errors {errors}" if errors else ""))
        self.opened = self.closed = self.calls = 0
        self.errors.clear()
        return line

    async def run(self, connections: Callable[[], int]) -> None:
        """Log the summary every ``interval_s`` (until cancelled); nothing when 0."""
        if self.interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.interval_s)
            line = self.summary(connections())
            if line is not None:
                self.log.info("%s", line)
