"""One stream's credited outbox: what waits for flow-control credit, in order.

Every place that sends on a stream without awaiting credit uses it: the
fan-out queue of :class:`~zrpc.session.StreamIO` and both directions of the
broker's :class:`~broker.edge.Relay` (client -> worker, worker -> client).
An item goes out at once when nothing waits before it and the stream has
credit; otherwise it queues. :meth:`Outbox.drain` (on a window update) sends
what the credit allows. Besides messages, the queue holds the end of the
sender's half (:data:`END`) and a final status (:class:`Final`), both sent
only after the messages queued before them.

Each message carries an ``ack``: bytes the owner returns to *its* producer
once the message is out (the broker chains credit across hops this way);
``on_ack`` receives their sum per call. ``on_final`` runs once a final
status is out; ``on_error`` when a message cannot be sent at all (larger
than the peer's ``max_message_size``, stream no longer sendable): the
queue is dropped then and the owner ends the stream.

``bytes`` is what the queued messages weigh; an outbox given a
:class:`Ledger` also charges them to it (a connection's, which charges its
process's), so that buffers are bounded in bytes per stream, per connection
and per process (docs/architecture.md, "Memory and fairness").
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import Final as _Final

from zrpc.protocol.connection import Connection
from zrpc.status import RpcError

__all__ = ["END", "Final", "Ledger", "Outbox", "buffer_full", "buffer_over"]


@dataclass(frozen=True, slots=True)
class Final:
    """A status ending the stream, waiting behind messages."""

    code: int
    message: str = ""
    details: Any = None


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


#: The end of the sender's half (client streaming), waiting behind messages.
END: _Final = _End()

#: A message: (payload, compressed, end_stream, ack).
_Message = tuple[bytes, bool, bool, int]


def buffer_full(limit: int) -> str:
    """The status message of a fan-out stream whose outbox overflowed."""
    return (f"stream buffer full ({limit} messages waiting for the client); "
            "the client is too slow: resume from your last id")


def buffer_over(limit: int) -> str:
    """The status message of a stream whose queued bytes passed its budget."""
    return (f"stream buffer full ({limit} bytes waiting for the client); "
            "the client is too slow: resume from your last id")


class Ledger:
    """Bytes queued for peers, with a budget; charges its ``parent`` too (connection -> process)."""

    __slots__ = ("bytes", "limit", "parent")

    def __init__(self, limit: int, parent: Ledger | None = None) -> None:
        self.limit = limit
        self.parent = parent
        self.bytes = 0

    def charge(self, n: int) -> None:
        self.bytes += n
        if self.parent is not None:
            self.parent.charge(n)

    @property
    def over(self) -> bool:
        return self.bytes > self.limit


def _ignore(_: Any) -> None:
    return None


class Outbox:
    """Messages, END and a final status for stream ``sid`` of ``conn`` (see module docstring)."""

    __slots__ = ("bytes", "conn", "items", "ledger", "on_ack", "on_error", "on_final", "sid")

    def __init__(self, conn: Connection, sid: int, *,
                 on_ack: Callable[[int], Any] = _ignore,
                 on_final: Callable[[Final], Any] = _ignore,
                 on_error: Callable[[RpcError], Any] | None = None,
                 ledger: Ledger | None = None) -> None:
        self.conn = conn
        self.sid = sid
        self.items: collections.deque[_Message | Final | _End] = collections.deque()
        self.on_ack = on_ack
        self.on_final = on_final
        self.on_error = on_error
        self.ledger = ledger
        self.bytes = 0  # payload bytes queued

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def clear(self) -> None:
        self.items.clear()
        self._weigh(-self.bytes)

    def _weigh(self, n: int) -> None:
        if n:
            self.bytes += n
            if self.ledger is not None:
                self.ledger.charge(n)

    # ---------------------------------------------------------------- put
    def put(self, payload: bytes, compressed: bool = False, end: bool = False, ack: int = 0) -> bool:
        """Send now if possible (True), else queue (False; drain on the next window update)."""
        conn = self.conn
        sid = self.sid
        if not self.items and sid in conn.streams:
            try:
                if conn.send_credit(sid) > 0:
                    conn.send_message(sid, payload, compressed=compressed, end_stream=end)
                    if ack:
                        self.on_ack(ack)
                    return True
            except RpcError as exc:
                self._failed(exc)
                return True
        self.items.append((payload, compressed, end, ack))
        self._weigh(len(payload))
        return False

    def put_end(self) -> bool:
        """End the sender's half after what is queued; True when it went out now."""
        if self.items:
            self.items.append(END)
            return False
        if self.sid in self.conn.streams:
            self.conn.end_stream(self.sid)
        return True

    def put_status(self, code: int, message: str = "", details: Any = None) -> bool:
        """End the stream with a status after what is queued; True when it went out now."""
        final = Final(code, message, details)
        if self.items:
            self.items.append(final)
            return False
        self._send_final(final)
        return True

    # -------------------------------------------------------------- drain
    def drain(self) -> bool:
        """Send what the credit allows, in order; True when nothing is left waiting."""
        items = self.items
        conn = self.conn
        sid = self.sid
        acked = 0
        try:
            while items:
                item = items[0]
                match item:
                    case Final():
                        items.popleft()
                        self._send_final(item)
                        break
                    case _End():
                        items.popleft()
                        if sid in conn.streams:
                            conn.end_stream(sid)
                    case (payload, compressed, end, ack):
                        if sid not in conn.streams:  # reset or closed: nothing more can go out
                            self.clear()
                            break
                        if conn.send_credit(sid) <= 0:
                            break
                        items.popleft()
                        self._weigh(-len(payload))
                        conn.send_message(sid, payload, compressed=compressed, end_stream=end)
                        acked += ack
        except RpcError as exc:
            self._failed(exc)
        if acked:
            self.on_ack(acked)
        return not items

    # ------------------------------------------------------------ helpers
    def _send_final(self, final: Final) -> None:
        if self.sid in self.conn.streams:
            self.conn.send_status(self.sid, final.code, final.message, final.details)
        self.on_final(final)

    def _failed(self, exc: RpcError) -> None:
        self.clear()
        if self.on_error is None:
            raise exc
        self.on_error(exc)
