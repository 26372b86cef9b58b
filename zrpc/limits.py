"""Connection-level limits shared by the in-process server and the broker edge.

* :class:`IpCounter`: connections per client IP (``max_connections_per_ip``);
* :func:`refuse_connection`: tell a client why it is refused (GOAWAY before
  HELLO, which the protocol allows) and close without waiting on it;
* :class:`IdleTimer`: close a connection that had no stream for
  ``idle_timeout_ms`` (keepalive PINGs do not count as activity);
* :class:`ConnectionTimers`: an accepted connection's handshake deadline,
  idle timer and close linger.
* :func:`apply_budget`: bound what a connection may have waiting for its
  client (``max_connection_buffer``) within the process's budget
  (``max_buffer_memory``), closing the connection holding the most when the
  process passes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgpack

from zrpc.outbox import Ledger
from zrpc.protocol.frames import FrameType, encode_frame
from zrpc.ratelog import RateLimitedLog
from zrpc.session import SessionBase
from zrpc.status import Status
from zrpc.tls import ALPN_PROTOCOL

if TYPE_CHECKING:
    from zrpc.config import ServerConfig

__all__ = ["CLOSE_LINGER_S", "ConnectionTimers", "IdleTimer", "IpCounter", "admit_connection", "alpn_refusal", "peer_ip",
           "peer_name", "refuse_connection"]

log = logging.getLogger("zrpc.limits")
#: Refused connections are logged once per 10 s per limit, with a count: a flood stays one line.
_refusals = RateLimitedLog(log, 10.0)

#: How long a closing connection may take to finish the TLS close before it is aborted.
CLOSE_LINGER_S = 2.0


def peer_ip(transport: Any) -> str:
    """The client's IP address (or the peername as text for non-IP transports)."""
    peername = transport.get_extra_info("peername")
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return str(peername)


class IpCounter:
    """Open connections per client IP, bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def try_add(self, ip: str) -> bool:
        n = self.counts.get(ip, 0)
        if n >= self.limit:
            return False
        self.counts[ip] = n + 1
        return True

    def release(self, ip: str) -> None:
        n = self.counts.get(ip, 0) - 1
        if n > 0:
            self.counts[ip] = n
        else:
            self.counts.pop(ip, None)


def refuse_connection(transport: Any, code: Status, message: str) -> None:
    """GOAWAY ``[0, code, message]``, then close (aborted after a short linger)."""
    try:
        transport.write(encode_frame(FrameType.GOAWAY, 0, 0, msgpack.packb([0, int(code), message])))
        transport.close()
    except Exception:  # the transport is already broken: nothing to tell
        transport.abort()
        return
    asyncio.get_running_loop().call_later(CLOSE_LINGER_S, transport.abort)


def peer_name(transport: Any) -> str:
    """``ip:port`` of the client (the peername as text for non-IP transports)."""
    peername = transport.get_extra_info("peername")
    return f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)


def alpn_refusal(transport: Any) -> str | None:
    """Why a TLS connection must be refused for its ALPN (None: it negotiated ``zrpc/1``,
    or it is not TLS). Clients that offer no ALPN, or only others (``h2``), are refused:
    ALPN is what tells a zrpc server from an HTTP one."""
    ssl_obj = transport.get_extra_info("ssl_object")
    if ssl_obj is None:
        return None
    selected = ssl_obj.selected_alpn_protocol()
    if selected == ALPN_PROTOCOL:
        return None
    return (f"this is a zrpc server: the TLS client must offer ALPN {ALPN_PROTOCOL!r} "
            f"({'it offered none we speak' if selected is None else f'it selected {selected!r}'})")


def admit_connection(transport: Any, *, serving: bool, open_connections: int, max_connections: int,
                     per_ip: IpCounter, check_alpn: bool = True) -> str | None:
    """Apply the connection limits to a new transport.

    Returns the client's IP (now counted in ``per_ip``; release it when the
    connection ends), or None after refusing the connection with a GOAWAY that
    names the limit. With ``check_alpn`` (every TLS listener except the
    WebSocket one, whose ALPN is ``http/1.1``) a client that did not negotiate
    ``zrpc/1`` is refused with GOAWAY ``FAILED_PRECONDITION``.
    """
    why = alpn_refusal(transport) if check_alpn else None
    if why is not None:
        _refusals.log("alpn", logging.INFO, "refusing connection from %s: %s", peer_name(transport), why)
        refuse_connection(transport, Status.FAILED_PRECONDITION, why)
        return None
    if not serving:
        refuse_connection(transport, Status.UNAVAILABLE, "server is shutting down")
        return None
    if open_connections >= max_connections:
        _refusals.log("max_connections", logging.WARNING, "refusing connection: max_connections (%d) reached",
                      max_connections)
        refuse_connection(transport, Status.UNAVAILABLE,
                          f"max_connections ({max_connections}) reached; retry later")
        return None
    ip = peer_ip(transport)
    if not per_ip.try_add(ip):
        _refusals.log("max_connections_per_ip", logging.WARNING,
                      "refusing connection from %s: max_connections_per_ip (%d) reached", ip, per_ip.limit)
        refuse_connection(transport, Status.RESOURCE_EXHAUSTED,
                          f"max_connections_per_ip ({per_ip.limit}) reached for {ip}")
        return None
    return ip


class IdleTimer:
    """Closes ``session`` after ``timeout_ms`` without any stream (GOAWAY OK, naming the limit).

    A connection is busy while a stream is in progress or when the client
    opened one since the last check; it is checked every quarter of the
    timeout, so an idle connection is closed between 1 and 1.5 timeouts after
    its last stream.
    """

    def __init__(self, session: SessionBase, timeout_ms: int) -> None:
        self.session = session
        self.timeout = timeout_ms / 1000
        self.timeout_ms = timeout_ms
        loop = session.loop
        self._since = loop.time()
        self._seen = 0
        self._handle: asyncio.TimerHandle | None = loop.call_later(self.timeout / 4, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        s = self.session
        self._handle = None
        if s.closed:
            return
        now = s.loop.time()
        conn = s.conn
        opened = conn.highest_stream_id
        if conn.streams or opened != self._seen:
            self._seen = opened
            self._since = now
        elif now - self._since >= self.timeout:
            message = (f"idle_timeout_ms ({self.timeout_ms}) reached: no streams for "
                       f"{now - self._since:.0f}s; reconnect when needed")
            conn.close(Status.OK, message)
            s.terminate(Status.UNAVAILABLE, message)
            return
        self._handle = s.loop.call_later(self.timeout / 4, self._check)


class ConnectionTimers:
    """The timers of one accepted connection, for the in-process server and the broker edge.

    * handshake: no HELLO within ``handshake_timeout_ms`` closes the connection with
      DEADLINE_EXCEEDED (``hello_done()`` says whether it arrived);
    * idle: :class:`IdleTimer` when ``idle_timeout_ms`` is set;
    * linger: :meth:`close` closes the transport and aborts it :data:`CLOSE_LINGER_S`
      later if the peer does not finish the TLS close (a peer that stopped reading would
      otherwise hold the socket for the transport's 30 s shutdown timeout).
    """

    __slots__ = ("_handshake", "_handshake_ms", "_idle", "_linger", "hello_done", "session")

    def __init__(self, session: SessionBase, config: ServerConfig,
                 hello_done: Callable[[], bool]) -> None:
        self.session = session
        self.hello_done = hello_done
        self._handshake_ms = config.handshake_timeout_ms
        self._handshake: asyncio.TimerHandle | None = session.loop.call_later(
            config.handshake_timeout_ms / 1000, self._expired)
        self._idle = IdleTimer(session, config.idle_timeout_ms) if config.idle_timeout_ms else None
        self._linger: asyncio.TimerHandle | None = None

    def check_hello(self) -> None:
        """Call after feeding data: the handshake deadline is over once HELLO arrived."""
        if self._handshake is not None and self.hello_done():
            self._handshake.cancel()
            self._handshake = None

    def _expired(self) -> None:
        self._handshake = None
        s = self.session
        if not s.closed and not self.hello_done():
            s.conn.close(Status.DEADLINE_EXCEEDED,
                         f"no HELLO within handshake_timeout_ms ({self._handshake_ms})")
            s.terminate(Status.DEADLINE_EXCEEDED, "handshake timeout")

    def stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def close(self, transport: Any) -> None:
        """Close ``transport`` (abort it after the linger)."""
        self.stop_idle()
        if transport is not None and not transport.is_closing():
            transport.close()
            self._linger = asyncio.get_running_loop().call_later(CLOSE_LINGER_S, transport.abort)

    def cancel(self) -> None:
        """The transport is gone: stop every timer."""
        for h in (self._handshake, self._linger):
            if h is not None:
                h.cancel()
        self._handshake = self._linger = None
        self.stop_idle()
def apply_budget(session: SessionBase, transport: Any, limit: int, process: Ledger,
                 sessions: Callable[[], Iterable[SessionBase]]) -> None:
    """Give a new connection's session its buffer budget (before it opens any stream).

    ``limit`` bytes may wait for its client (queued stream messages, coalesced
    output, the transport's buffer); they also count against ``process``. The
    transport's ``pause_writing`` (forwarded to the session by its protocol)
    stops streams from writing more into the transport meanwhile.
    """
    session.ledger = Ledger(limit, process)
    buffered = getattr(transport, "get_write_buffer_size", None)  # a QUIC stream pipe has none
    if buffered is not None:
        session.transport_buffered = buffered
    session.shed = lambda: shed_largest(sessions(), process)


def shed_largest(sessions: Iterable[SessionBase], process: Ledger) -> None:
    """The process passed its buffer budget: close the connection with the most waiting."""
    biggest, most = None, -1
    for s in sessions:
        if s.ledger is not None and not s.closed and s.ledger.bytes > most:
            biggest, most = s, s.ledger.bytes
    if biggest is not None:
        biggest.close_over_budget(
            f"server buffer memory over its budget ({process.bytes} bytes waiting for all clients, "
            f"limit {process.limit}); this connection had the most waiting ({most} bytes)")


class WritePauses:
    """asyncio Protocol mixin: the transport's ``pause_writing``/``resume_writing`` reach the session."""

    session: SessionBase | None

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_writing()

    def resume_writing(self) -> None:
        if self.session is not None and not self.session.closed:
            self.session.resume_writing()
