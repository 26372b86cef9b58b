"""Stream states as a transition table.

A stream is opened by the client (odd ids). The client half-closes with END
(or a MESSAGE flagged END_STREAM); the server ends the stream with STATUS;
either side may abort it with RESET. The table below is the whole state
machine: a pair missing from it is a protocol violation.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["TRANSITIONS", "StreamEvent", "StreamState", "transition"]


class StreamState(enum.Enum):
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half_closed_local"    # we sent END, peer may still send
    HALF_CLOSED_REMOTE = "half_closed_remote"  # peer sent END, we may still send
    CLOSED = "closed"

    __hash__ = object.__hash__  # members are singletons: identity hashing, in C (hot path)


class StreamEvent(enum.Enum):
    SEND_MESSAGE = "send_message"
    RECV_MESSAGE = "recv_message"
    SEND_END = "send_end"          # client only
    RECV_END = "recv_end"          # server only
    SEND_STATUS = "send_status"    # server only
    RECV_STATUS = "recv_status"    # client only
    SEND_RESET = "send_reset"
    RECV_RESET = "recv_reset"

    __hash__ = object.__hash__


_S = StreamState
_E = StreamEvent

TRANSITIONS: Final[dict[tuple[StreamState, StreamEvent], StreamState]] = {
    (_S.OPEN, _E.SEND_MESSAGE): _S.OPEN,
    (_S.OPEN, _E.RECV_MESSAGE): _S.OPEN,
    (_S.OPEN, _E.SEND_END): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _E.RECV_END): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _E.SEND_STATUS): _S.CLOSED,
    (_S.OPEN, _E.RECV_STATUS): _S.CLOSED,
    (_S.OPEN, _E.SEND_RESET): _S.CLOSED,
    (_S.OPEN, _E.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_MESSAGE): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_STATUS): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _E.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _E.SEND_MESSAGE): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _E.SEND_STATUS): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _E.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _E.RECV_RESET): _S.CLOSED,
}


def transition(state: StreamState, event: StreamEvent) -> StreamState | None:
    """The next state, or None when ``event`` is not allowed in ``state``."""
    return TRANSITIONS.get((state, event))
