"""The QUIC transport adapter (aioquic): a zrpc connection over QUIC streams.

Thin glue between aioquic and the rest of zrpc. :class:`QuicPipe` presents
one QUIC connection to an ordinary ``asyncio.Protocol`` (the client's, the
in-process server's or the broker edge's, unchanged) as a byte pipe of zrpc
frames: what the session writes is cut per QUIC stream by the sans-IO
:class:`~zrpc.protocol.quic.StreamMux`, and each QUIC stream's bytes come
back as complete frames. Sessions, limits, authentication and metrics are
therefore the same as over TLS/TCP; only the adapter differs (see
:mod:`zrpc.transport`).

Settings map to QUIC transport parameters as ``docs/protocol.md`` ("zrpc
over QUIC") specifies: ``initial_max_stream_data_bidi_*`` = stream window +
max message size, ``initial_max_data`` = connection window + max message
size, ``initial_max_streams_bidi`` = ``max_concurrent_streams`` + 1 (the
control stream), ``max_idle_timeout`` = :data:`QUIC_IDLE_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from aioquic import tls
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.tls import SessionTicket

from zrpc.limits import CLOSE_LINGER_S
from zrpc.protocol.connection import Settings
from zrpc.protocol.frames import CONTROL_FRAME_LIMIT
from zrpc.protocol.quic import CONTROL_STREAM, StreamMux
from zrpc.status import ProtocolError, RpcError, Status
from zrpc.tls import ALPN_PROTOCOL, TlsConfig

__all__ = [
    "CLIENT_TICKETS",
    "QUIC_IDLE_TIMEOUT_S",
    "QuicListener",
    "QuicPipe",
    "TicketStore",
    "client_configuration",
    "connect_quic",
    "serve_quic",
    "server_configuration",
]

log = logging.getLogger("zrpc.quic")
#: QUIC's max_idle_timeout on both ends; zrpc's keepalive and idle_timeout_ms act well within it.
QUIC_IDLE_TIMEOUT_S = 900.0
#: Bytes a client may send before its handshake completes (0-RTT), held until it does.
_MAX_EARLY_BYTES = 64 * 1024
#: Session tickets the server keeps for resumption (each used once), and the client's cache.
_MAX_TICKETS = 10_000
#: UDP socket buffer size asked for (each direction).
_SOCKET_BUFFER = 4 * 1024 * 1024
#: How long a closing QUIC connection may take before its UDP socket (client) is closed anyway.
AppFactory = Callable[[], asyncio.Protocol]


def _check_tls(tls: TlsConfig) -> None:
    if tls.plaintext:
        raise ValueError("QUIC always encrypts: TlsConfig.insecure_plaintext() cannot be used with quic://")


def server_configuration(tls: TlsConfig, settings: Settings) -> QuicConfiguration:
    """The aioquic server configuration for ``tls`` (certificate and key) and zrpc ``settings``."""
    _check_tls(tls)
    if tls.cert_file is None:
        raise ValueError("QUIC listener: TlsConfig.cert_file (server certificate) is required")
    if tls.require_client_cert:
        raise ValueError("QUIC listener: client certificates (require_client_cert) are supported "
                         "on TLS/TCP listeners only; authenticate QUIC clients with tokens")
    cfg = _configuration(False, settings)
    cfg.load_cert_chain(tls.cert_file, tls.key_file)
    return cfg


def client_configuration(tls: TlsConfig, host: str, settings: Settings) -> QuicConfiguration:
    """The aioquic client configuration: verify the server against ``tls.ca_file`` (or certifi)."""
    _check_tls(tls)
    cfg = _configuration(True, settings)
    cfg.server_name = tls.server_hostname or host
    if tls.ca_file is not None:
        cfg.load_verify_locations(cafile=tls.ca_file)
    if tls.cert_file is not None and (tls.cert_file, tls.key_file) != tls._dev_server_pair:
        cfg.load_cert_chain(tls.cert_file, tls.key_file)
    return cfg


def _configuration(is_client: bool, settings: Settings) -> QuicConfiguration:
    # QUIC's windows sit above zrpc's WINDOW credit (which bounds what the application has
    # not consumed): room for the credit plus the one message a sender may overshoot by.
    return QuicConfiguration(
        is_client=is_client, alpn_protocols=[ALPN_PROTOCOL], idle_timeout=QUIC_IDLE_TIMEOUT_S,
        max_stream_data=settings.initial_stream_window + settings.max_message_size,
        max_data=settings.initial_connection_window + settings.max_message_size)


def _grow_buffers(transport: asyncio.BaseTransport) -> None:
    """Ask for 4 MiB UDP socket buffers (the kernel caps them at net.core.rmem_max/wmem_max).

    Loopback bursts of many streams overflow the 208 KiB default: a dropped
    datagram costs a loss-recovery round (tens of ms at p99).
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)


def _mux(is_client: bool, settings: Settings) -> StreamMux:
    return StreamMux(is_client, settings.max_message_size, CONTROL_FRAME_LIMIT,
                     settings.initial_connection_window + settings.max_message_size)


class QuicPipe:
    """The transport handed to the zrpc protocol: writes are routed to QUIC streams."""

    def __init__(self, proto: _ZrpcQuicProtocol) -> None:
        self._proto = proto
        self._closing = False

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        self._proto.send(data)

    def is_closing(self) -> bool:
        return self._closing

    def close(self, code: int = 0, reason: str = "") -> None:
        if not self._closing:
            self._closing = True
            self._proto.close_connection(code, reason)

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._proto.peer_address()
        if name == "transport":
            return "quic"
        if name == "session_resumed":
            return self._proto.session_resumed
        return default


class _ZrpcQuicProtocol(QuicConnectionProtocol):
    """One QUIC connection carrying one zrpc connection (client or server end)."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, app_factory: AppFactory,
                 settings: Settings, handshake_timeout: float | None = None,
                 on_end: Callable[[_ZrpcQuicProtocol], None] | None = None) -> None:
        super().__init__(quic)
        self.is_client = quic.configuration.is_client
        self.mux = _mux(self.is_client, settings)
        self.pipe = QuicPipe(self)
        self.app: asyncio.Protocol | None = None
        self._app_factory = app_factory
        self._on_end = on_end
        self._ended = False
        self.handshake_done: asyncio.Future[None] = self._loop.create_future()
        self.session_resumed = False
        # server: stream data before the handshake completes (0-RTT) waits here (None: complete)
        self._early: list[tuple[int, bytes, bool]] | None = None if self.is_client else []
        self._early_bytes = 0
        self._handshake_timer: asyncio.TimerHandle | None = None
        if not self.is_client:
            # aioquic's limit is a fixed 128; zrpc's max_concurrent_streams plus the control stream
            limit = quic._local_max_streams_bidi
            limit.value = limit.sent = settings.max_concurrent_streams + 1
        if handshake_timeout is not None:
            self._handshake_timer = self._loop.call_later(handshake_timeout, self._handshake_expired)

    def peer_address(self) -> Any:
        return self._quic.get_peer_address()

    # ------------------------------------------------------------- output
    def send(self, data: bytes, transmit: bool = True) -> None:
        quic = self._quic
        for quic_id, chunk, fin in self.mux.split(data):
            try:
                quic.send_stream_data(quic_id, chunk, end_stream=fin)
            except ValueError:  # the peer stopped the stream (STOP_SENDING): the zrpc stream is over
                pass
        if transmit:
            # A pending ACK leaves with this data instead of in its own datagram when aioquic's
            # 1 ms ACK timer fires (aioquic adds an ACK to a packet only once it is due).
            space = quic._spaces.get(tls.Epoch.ONE_RTT)
            if space is not None and space.ack_at is not None:
                space.ack_at = self._loop.time()
            self._transmit_soon()

    def close_connection(self, code: int, reason: str) -> None:
        if not code and not reason and self.mux.last_goaway is not None:
            code, reason = self.mux.last_goaway  # the GOAWAY's reason, in case its packet is lost
        self.transmit()  # what is queued (the GOAWAY) goes out before CONNECTION_CLOSE
        self._quic.close(error_code=code, reason_phrase=reason)
        self.transmit()
        if self.is_client:
            self._loop.call_later(CLOSE_LINGER_S, self._end, None)

    # -------------------------------------------------------------- input
    def quic_event_received(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.StreamDataReceived):
            self._data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, (qe.StreamReset, qe.StopSendingReceived)):
            try:
                self._deliver(self.mux.stream_reset(event.stream_id, event.error_code))
            except ProtocolError as exc:
                self._violation(exc)
        elif isinstance(event, qe.HandshakeCompleted):
            if event.alpn_protocol != ALPN_PROTOCOL:
                self._violation(ProtocolError(f"the peer does not speak {ALPN_PROTOCOL}", Status.UNAVAILABLE))
                return
            self.session_resumed = event.session_resumed
            if self.is_client:
                self._start()
                if not self.handshake_done.done():
                    self.handshake_done.set_result(None)
            else:
                self._handshake_complete()
        elif isinstance(event, qe.ConnectionTerminated):
            if self.is_client and not self.handshake_done.done():
                self.handshake_done.set_exception(
                    RpcError(Status.UNAVAILABLE, f"QUIC handshake failed: {event.reason_phrase or event.error_code}"))
            reason = event.reason_phrase or f"QUIC connection closed (error {event.error_code})"
            self._end(ConnectionError(reason) if event.error_code else None)

    def _data(self, quic_id: int, data: bytes, end: bool) -> None:
        early = self._early
        if early is not None:
            # 0-RTT data (a resumed client may send it before the handshake completes): held,
            # unprocessed, until the handshake completes, so a replay of it does nothing
            self._early_bytes += len(data)
            if self._early_bytes > _MAX_EARLY_BYTES:
                self._violation(ProtocolError(f"more than {_MAX_EARLY_BYTES} bytes before the handshake "
                                              "completed", Status.RESOURCE_EXHAUSTED))
                return
            early.append((quic_id, data, end))
            return
        if self.app is None and not self.is_client:
            if quic_id != CONTROL_STREAM:
                self._violation(ProtocolError("a stream before the HELLO on the control stream", Status.INTERNAL))
                return
            self._start()  # the client opened the control stream: the zrpc connection begins
        try:
            frames = self.mux.receive(quic_id, data, end)
        except ProtocolError as exc:
            self._violation(exc)
            return
        self._deliver(frames)

    def _handshake_complete(self) -> None:
        early, self._early = self._early, None
        for quic_id, data, end in early or ():
            if self.pipe.is_closing():
                return
            self._data(quic_id, data, end)

    def _deliver(self, frames: bytes) -> None:
        app = self.app
        if frames and app is not None and not self.pipe.is_closing():
            app.data_received(frames)
        if not self.pipe.is_closing() and self.mux.fins_owed:
            # FINs owed for streams the frames closed: they leave in the datagram aioquic
            # transmits once the received one is processed
            self.send(b"", transmit=False)

    def _start(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.app = self._app_factory()
        self.app.connection_made(self.pipe)  # type: ignore[arg-type]
        session = getattr(self.app, "session", None)  # every zrpc protocol keeps its session there
        if session is not None:
            session.conn.stream_ids_in_order = False  # OPENs of different QUIC streams arrive in any order

    def _violation(self, exc: ProtocolError) -> None:
        log.info("closing QUIC connection from %s: %s", self.peer_address(), exc)
        self.pipe.close(int(exc.code), str(exc))
        self._end(ConnectionError(str(exc)))

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.app is None:
            self.pipe.close(int(Status.DEADLINE_EXCEEDED), "no QUIC handshake and HELLO within handshake_timeout_ms")
            self._end(None)

    def _end(self, exc: Exception | None) -> None:
        if self._ended:
            return
        self._ended = True
        self.pipe._closing = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.app is not None:
            self.app.connection_lost(exc)
        if self._on_end is not None:
            self._on_end(self)
        if self.is_client and self._transport is not None:
            self._transport.close()


class TicketStore:
    """Session tickets for resumption, each usable once (bounded; the oldest are forgotten).

    The server's store maps the tickets it issued to their secrets; the client's
    (:data:`CLIENT_TICKETS`) keeps the last ticket per server.
    """

    def __init__(self, capacity: int = _MAX_TICKETS) -> None:
        self.capacity = capacity
        self._tickets: collections.OrderedDict[bytes, SessionTicket] = collections.OrderedDict()

    def add(self, key: bytes, ticket: SessionTicket) -> None:
        self._tickets[key] = ticket
        self._tickets.move_to_end(key)
        while len(self._tickets) > self.capacity:
            self._tickets.popitem(last=False)

    def pop(self, key: bytes) -> SessionTicket | None:
        return self._tickets.pop(key, None)

    def clear(self) -> None:
        self._tickets.clear()

    def __len__(self) -> int:
        return len(self._tickets)


#: The client's session tickets, one per (server name, host, port): a later connection to the
#: same server resumes (abbreviated TLS handshake, no certificate exchange). Process-wide.
CLIENT_TICKETS = TicketStore(1000)


class QuicListener:
    """A UDP listener accepting zrpc-over-QUIC connections (see :func:`serve_quic`)."""

    def __init__(self, server: QuicServer, transport: asyncio.DatagramTransport) -> None:
        self._server = server
        self._transport = transport
        self.connections: set[_ZrpcQuicProtocol] = set()
        self.accepting = True

    @property
    def address(self) -> tuple[str, int]:
        name = self._transport.get_extra_info("sockname")
        return name[0], name[1]

    def stop_accepting(self) -> None:
        """New QUIC connections are closed with UNAVAILABLE; open ones carry on (graceful shutdown)."""
        self.accepting = False

    def close(self) -> None:
        """Close every QUIC connection still open and the UDP socket."""
        self.accepting = False
        for proto in list(self.connections):
            proto.pipe.close(int(Status.UNAVAILABLE), "server shut down")
        self._server.close()


async def serve_quic(host: str, port: int, tls: TlsConfig, settings: Settings, app_factory: AppFactory, *,
                     handshake_timeout: float, max_connections: int) -> QuicListener:
    """Listen on UDP ``host:port``; each QUIC connection gets ``app_factory()`` as its protocol.

    ``max_connections`` bounds QUIC connections, handshakes included (past it a
    new one is closed with UNAVAILABLE at once); ``handshake_timeout`` bounds the
    QUIC handshake plus the client's HELLO.
    """
    configuration = server_configuration(tls, settings)
    loop = asyncio.get_running_loop()
    holder: list[QuicListener] = []

    def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> _ZrpcQuicProtocol:
        listener = holder[0]
        proto = _ZrpcQuicProtocol(quic, app_factory=app_factory, settings=settings,
                                  handshake_timeout=handshake_timeout,
                                  on_end=listener.connections.discard)
        if not listener.accepting:
            loop.call_soon(proto.pipe.close, int(Status.UNAVAILABLE), "server is shutting down")
        elif len(listener.connections) >= max_connections:
            loop.call_soon(proto.pipe.close, int(Status.UNAVAILABLE),
                           f"max_connections ({max_connections}) reached; retry later")
        else:
            listener.connections.add(proto)
        return proto

    tickets = TicketStore()
    transport, server = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=configuration, create_protocol=create_protocol,
                           session_ticket_fetcher=tickets.pop,
                           session_ticket_handler=lambda t: tickets.add(t.ticket, t)),
        local_addr=(host, port))
    _grow_buffers(transport)
    holder.append(QuicListener(server, transport))
    return holder[0]


async def connect_quic(host: str, port: int, tls: TlsConfig, settings: Settings,
                       app_factory: AppFactory) -> tuple[QuicPipe, asyncio.Protocol]:
    """Open a QUIC connection; returns the pipe and the protocol made by ``app_factory``.

    The caller bounds the time (``asyncio.timeout``); cancelled, the UDP socket is closed.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    configuration = client_configuration(tls, host, settings)
    key = f"{configuration.server_name}|{host}|{port}".encode()
    configuration.session_ticket = CLIENT_TICKETS.pop(key)
    quic = QuicConnection(configuration=configuration,
                          session_ticket_handler=lambda t: CLIENT_TICKETS.add(key, t))
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _ZrpcQuicProtocol(quic, app_factory=app_factory, settings=settings),
        local_addr=("::" if family == socket.AF_INET6 else "0.0.0.0", 0), family=family)
    _grow_buffers(transport)
    try:
        proto.connect(addr)
        await proto.handshake_done
    except BaseException:
        proto.pipe.close(int(Status.CANCELLED), "connect abandoned")
        transport.close()
        raise
    assert proto.app is not None
    return proto.pipe, proto.app
