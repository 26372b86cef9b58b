"""Thin asyncio glue shared by client and server sessions.

A session owns one sans-IO :class:`~zrpc.protocol.Connection` and a ``write``
callable (a socket transport, a ZeroMQ socket, or an in-memory pipe). It
coalesces output (one write per loop iteration), wakes senders when credit
arrives and drives keepalive. :class:`StreamIO` is the per-stream half that
both sides share: a receive queue that returns credit as the application
consumes, and a send path that waits for credit, plus a bounded outbox for
events pushed without awaiting (fan-out).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any, Protocol

from zrpc.codec import decompress
from zrpc.outbox import Ledger, Outbox, buffer_full, buffer_over
from zrpc.protocol.connection import Connection
from zrpc.protocol.events import ConnectionTerminated, Event
from zrpc.protocol.frames import FrameType
from zrpc.redact import redact
from zrpc.status import RpcError, Status, StreamClosed

__all__ = ["CreditWaiter", "SessionBase", "StreamIO"]

log = logging.getLogger("zrpc.session")
_BURST = 64 * 1024  # queued output past which a sender flushes and yields
frame_log = logging.getLogger("zrpc.frames")


def _nothing() -> int:
    return 0


def _no_shed() -> None:
    return None


class CreditWaiter(Protocol):
    """A stream waiting for send credit (woken by :meth:`SessionBase.window_updated`)."""

    sid: int

    def credit_arrived(self) -> None: ...


class SessionBase:
    """Connection + output coalescing + credit waiters + keepalive."""

    def __init__(self, conn: Connection, write: Callable[[bytes], Any],
                 close_transport: Callable[[], Any], *, debug: bool = False) -> None:
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        self._write = write
        self._close_transport = close_transport
        self._flush_handle: asyncio.Handle | None = None
        self._blocked: dict[int, CreditWaiter] = {}
        self._keepalive: asyncio.TimerHandle | None = None
        self.debug = debug
        self.closed = False
        self.peer: str | None = None
        self.identity: str | None = None       # who the peer is (token sub, certificate CN)
        self.claims: dict[str, Any] = {}       # verified token claims
        self._expiry: asyncio.TimerHandle | None = None
        #: bytes queued for this peer in stream outboxes, with the connection's budget (None: none)
        self.ledger: Ledger | None = None
        #: the transport's unflushed bytes (set by whatever owns the transport)
        self.transport_buffered: Callable[[], int] = _nothing
        #: called when the process passed its buffer budget (the owner closes the biggest user)
        self.shed: Callable[[], None] = _no_shed

    # ---------------------------------------------------- memory budget
    def pause_writing(self) -> None:
        """The transport's buffer is full: stop giving streams credit (asyncio Protocol hook)."""
        self.conn.pause_output()

    def resume_writing(self) -> None:
        """The transport drained: credit is back; blocked streams send what they queued."""
        self.conn.resume_output()
        self.window_updated(0)
        self.flush()

    def buffered(self) -> int:
        """Bytes waiting for the peer: queued stream messages, coalesced output, the transport's."""
        queued = self.ledger.bytes if self.ledger is not None else 0
        return queued + self.conn.bytes_to_send + self.transport_buffered()

    def within_budget(self) -> bool:
        """False when the connection passed its budget: it is then ended with GOAWAY RESOURCE_EXHAUSTED.

        Call after queueing output. Past the process budget (the ledger's
        parent) ``shed`` picks which connection goes.
        """
        ledger = self.ledger
        if ledger is None or self.closed:
            return True
        if ledger.parent is not None and ledger.parent.over:
            self.shed()
            if self.closed:
                return False
        waiting = self.buffered()
        if waiting <= ledger.limit:
            return True
        self.close_over_budget(f"connection buffer over its budget ({waiting} bytes waiting for the "
                               f"client, limit {ledger.limit}); the client does not read fast enough")
        return False

    def close_over_budget(self, why: str) -> None:
        """End the connection: GOAWAY RESOURCE_EXHAUSTED (every stream is gone) and close."""
        if self.closed:
            return
        log.warning("closing connection from %s: %s", self.peer, why)
        self.end_streams(Status.RESOURCE_EXHAUSTED, why)
        self.conn.close(Status.RESOURCE_EXHAUSTED, why)
        self.terminate(Status.RESOURCE_EXHAUSTED, why)

    # -------------------------------------------------------------- output
    def schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        if self.conn.has_data_to_send and not self.closed:
            data = self.conn.data_to_send()
            if self.debug:
                _trace("send", data)
            self._write(data)

    # -------------------------------------------------------------- credit
    def block(self, io: CreditWaiter) -> None:
        self._blocked[io.sid] = io

    def unblock(self, io: CreditWaiter) -> None:
        self._blocked.pop(io.sid, None)

    def window_updated(self, sid: int) -> None:
        if sid == 0:
            for io in list(self._blocked.values()):
                io.credit_arrived()
        else:
            waiting = self._blocked.get(sid)
            if waiting is not None:
                waiting.credit_arrived()

    # ----------------------------------------------------------- keepalive
    def start_keepalive(self) -> None:
        interval = self.conn.local.keepalive_interval_ms
        if interval:
            period = min(interval, self.conn.local.keepalive_timeout_ms) / 2000
            self._keepalive = self.loop.call_later(period, self._tick, period)

    def _tick(self, period: float) -> None:
        if self.closed:
            return
        for ev in self.conn.tick(self.loop.time()):
            if isinstance(ev, ConnectionTerminated):
                log.info("closing connection: %s", ev.message)
                self.terminate(ev.code, ev.message)
                return
        self.flush()
        self._keepalive = self.loop.call_later(period, self._tick, period)

    # ----------------------------------------------------------- handshake
    def accept_hello(self, settings: dict[str, Any], authenticator: Any) -> bool:
        """Authenticate the peer's HELLO and answer it; False when refused (connection closed).

        ``authenticator(hello, peer) -> (identity, claims)`` raises RpcError to
        refuse. Without a token, an identity from the client certificate is
        kept. A token with ``exp`` ends the connection when it expires.
        """
        try:
            if authenticator is not None:
                identity, claims = authenticator(settings, self.peer)
                if identity is not None or self.identity is None:  # no token: keep a cert identity
                    self.identity, self.claims = identity, claims
        except RpcError as exc:
            self.conn.close(exc.status, exc.message)
            self.terminate(exc.status, exc.message)
            return False
        self.conn.send_hello()
        self.start_keepalive()
        from zrpc.auth import expiry_delay

        delay = expiry_delay(authenticator, self.claims)
        if delay is not None:
            self._expiry = self.loop.call_later(delay, self._token_expired)
        return True

    def _token_expired(self) -> None:
        """The token's ``exp`` passed: end every stream and the connection with UNAUTHENTICATED."""
        from zrpc.auth import TOKEN_EXPIRED_MESSAGE

        if self.closed:
            return
        self.end_streams(Status.UNAUTHENTICATED, TOKEN_EXPIRED_MESSAGE)
        self.conn.close(Status.UNAUTHENTICATED, TOKEN_EXPIRED_MESSAGE)
        self.terminate(Status.UNAUTHENTICATED, TOKEN_EXPIRED_MESSAGE)

    def end_streams(self, code: Status, message: str) -> None:
        """Subclasses end every open stream with a status here."""

    # ------------------------------------------------------------- closing
    def terminate(self, code: int, message: str) -> None:
        """Flush what is queued (a GOAWAY) and close the transport."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        self._cancel_timers()
        self.on_closed(RpcError(Status.coerce(code) if code else Status.UNAVAILABLE,
                                message or "connection closed"))
        self._close_transport()

    def _cancel_timers(self) -> None:
        for timer in (self._keepalive, self._expiry):
            if timer is not None:
                timer.cancel()

    def on_closed(self, error: RpcError) -> None:
        """Subclasses fail their calls here."""

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timers()
        self.conn.closed = True
        self.on_closed(RpcError(Status.UNAVAILABLE, f"connection lost: {exc}" if exc else "connection lost"))


class StreamIO:
    """One stream's receive queue and flow-controlled send path."""

    __slots__ = ("_credit", "_ended", "_error", "_inbox", "_outbox", "_reader", "max_outbox",
                 "max_outbox_bytes", "on_abort", "session", "sid")

    def __init__(self, session: SessionBase, sid: int, max_outbox: int = 4096,
                 max_outbox_bytes: int = 4 * 1024 * 1024) -> None:
        self.session = session
        self.sid = sid
        self._inbox: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._reader: asyncio.Future[None] | None = None
        self._credit: asyncio.Future[None] | None = None
        self._ended = False
        self._error: RpcError | None = None
        self._outbox = Outbox(session.conn, sid, on_error=self._undeliverable, ledger=session.ledger)
        self.max_outbox = max_outbox
        self.max_outbox_bytes = max_outbox_bytes
        #: ends the stream with a status when a pushed event cannot be delivered
        self.on_abort: Callable[[Status, str], None] | None = None

    # ------------------------------------------------------------ receive
    def feed(self, payload: bytes, compressed: bool) -> None:
        self._inbox.append((payload, compressed))
        r = self._reader
        if r is not None and not r.done():
            r.set_result(None)

    def feed_end(self) -> None:
        self._ended = True
        r = self._reader
        if r is not None and not r.done():
            r.set_result(None)

    def fail(self, error: RpcError) -> None:
        """The stream is over (status, reset, lost connection): wake everyone."""
        if self._error is None:
            self._error = error
        self._ended = True
        for fut in (self._reader, self._credit):
            if fut is not None and not fut.done():
                fut.set_result(None)
        self._outbox.clear()
        self.session.unblock(self)

    @property
    def error(self) -> RpcError | None:
        return self._error

    async def recv_raw(self) -> bytes | None:
        """Next payload (decompressed), None after the peer's end; raises the stream's error."""
        inbox = self._inbox
        while not inbox:
            if self._error is not None and self._error.status is not Status.OK:
                raise self._error
            if self._ended:
                return None
            self._reader = self.session.loop.create_future()
            await self._reader
            self._reader = None
        payload, compressed = inbox.popleft()
        session = self.session
        session.conn.acknowledge(self.sid, len(payload))
        if session.conn.has_data_to_send:
            session.schedule_flush()
        if compressed:
            payload = decompress(payload, session.conn.local.max_message_size)
        return payload

    # --------------------------------------------------------------- send
    async def send_raw(self, payload: bytes, compressed: bool = False, end_stream: bool = False) -> None:
        """Send one payload, waiting for flow-control credit."""
        conn = self.session.conn
        while True:
            if self._error is not None:
                raise StreamClosed(f"stream ended: {self._error.message or self._error.status.name}",
                                   status=self._error.status)
            try:
                credit = conn.send_credit(self.sid)
            except StreamClosed:
                self.fail(RpcError(Status.CANCELLED, "stream closed"))
                raise
            if credit > 0 and not self._outbox:
                break
            self._credit = self.session.loop.create_future()
            self.session.block(self)
            await self._credit
            self._credit = None
        conn.send_message(self.sid, payload, end_stream=end_stream, compressed=compressed)
        if conn.bytes_to_send >= _BURST:
            # A sender with plenty of credit would otherwise never yield: write what is queued
            # now and let the other streams (and the reader) run.
            self.session.flush()
            await asyncio.sleep(0)
        else:
            self.session.schedule_flush()

    def push_nowait(self, payload: bytes) -> bool:
        """Queue a payload without waiting (fan-out); False when the stream overflowed and ended.

        An event larger than the peer's ``max_message_size`` also ends the
        stream (RESOURCE_EXHAUSTED): skipping it would be a silent gap.
        """
        if self._error is not None:
            return False
        outbox = self._outbox
        if len(outbox) >= self.max_outbox:
            self._abort(Status.RESOURCE_EXHAUSTED, buffer_full(self.max_outbox))
            return False
        if outbox.bytes + len(payload) > self.max_outbox_bytes:
            self._abort(Status.RESOURCE_EXHAUSTED, buffer_over(self.max_outbox_bytes))
            return False
        if not outbox.put(payload):
            self.session.block(self)
            self.session.within_budget()
        else:
            self.session.schedule_flush()
        return self._error is None

    def _undeliverable(self, exc: RpcError) -> None:
        self._abort(exc.status, f"{exc.message}; raise the client's max_message_size")

    def _abort(self, code: Status, message: str) -> None:
        if self.on_abort is not None:
            self.on_abort(code, message)
        else:
            self.fail(RpcError(code, message))

    def credit_arrived(self) -> None:
        if self._outbox:
            done = self._outbox.drain()
            self.session.schedule_flush()
            if not done:
                return
        self.session.unblock(self)
        c = self._credit
        if c is not None and not c.done():
            c.set_result(None)

    @property
    def queued(self) -> int:
        return len(self._outbox)


def _trace(direction: str, data: bytes) -> None:
    from zrpc.protocol.frames import FrameDecoder

    try:
        for ftype, flags, sid, payload in FrameDecoder(2**32).feed(data):
            frame_log.debug("%s %s flags=%#x stream=%d len=%d", direction, FrameType(ftype).name,
                            flags, sid, len(payload))
    except Exception:  # tracing must never break the connection
        frame_log.debug("%s %d bytes (unparsable)", direction, len(data))


def trace_events(events: list[Event]) -> None:
    """Log received events (``--debug-frames``), secrets such as HELLO's token redacted."""
    for ev in events:
        frame_log.debug("recv %s", redact(repr(ev)))
