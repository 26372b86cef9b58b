"""The per-call context handed to every handler (the streaming tutorial's ``RequestContext``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zrpc.fanout import Bus

__all__ = ["RequestContext"]


@dataclass
class RequestContext:
    """What a handler knows about its call.

    ``deadline`` is in the event loop's clock (``loop.time()``), None for no
    deadline. ``identity`` is the authenticated user (a JWT ``sub`` or a client
    certificate's subject) or None on an unauthenticated connection; ``claims``
    the verified token claims. ``bus`` publishes events to attached streams.
    """

    method: str
    metadata: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None
    peer: str | None = None
    identity: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    bus: Bus | None = None
    _cancelled: asyncio.Event | None = field(default=None, repr=False)

    def time_remaining(self) -> float | None:
        """Seconds until the deadline (None when there is none)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    @property
    def cancelled(self) -> bool:
        return self._cancelled is not None and self._cancelled.is_set()
