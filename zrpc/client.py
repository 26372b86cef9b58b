"""The asyncio client: one connection, many multiplexed calls.

API (the streaming tutorial's, docs/streaming-tutorial.md, in Python style)::

    async with zrpc.Client(zrpc.ClientConfig()) as client:
        await client.connect("localhost:8443")  # TLS: system store + development CA
        reply = await client.unary("Chat/SendMessage", msg, ChatResponse)
        up = await client.client_stream("Chat/SendMessageBatch", Message, BatchSummary)
        down = await client.server_stream("Chat/SubscribeToRoom", req, ChatResponse)
        both = await client.bidirectional_stream("Chat/JoinChat", Message, ChatResponse)

Every call takes ``timeout`` (seconds) and ``metadata``. Cancelling the task
awaiting a call resets the stream, which cancels the handler on the server.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from zrpc.address import Address, parse_address
from zrpc.codec import DecodeError, compress, decode, encode
from zrpc.config import ClientConfig
from zrpc.protocol.connection import Connection, Role
from zrpc.protocol.events import (
    ConnectionTerminated,
    GoAwayReceived,
    HelloReceived,
    MessageReceived,
    StatusReceived,
    StreamReset,
    WindowUpdated,
)
from zrpc.session import SessionBase, StreamIO, trace_events
from zrpc.status import ConnectionReset, RpcError, Status, Timeout, call_status, error_for
from zrpc.tls import ALPN_PROTOCOL, TlsConfig

__all__ = [
    "BidirectionalStream",
    "Client",
    "ClientCall",
    "ClientSession",
    "ClientStream",
    "ServerStream",
]

log = logging.getLogger("zrpc.client")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class ClientCall:
    """One stream's client half: send, receive, the final status."""

    __slots__ = ("_status", "_timer", "io", "resp_type", "session", "sid", "threshold")

    def __init__(self, session: ClientSession, sid: int, resp_type: Any) -> None:
        self.session = session
        self.sid = sid
        self.resp_type = resp_type
        self.io = StreamIO(session, sid)
        self._status: asyncio.Future[RpcError] = session.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self.threshold = session.config.stream_config.threshold

    def finish(self, code: int, message: str = "", details: Any = None) -> None:
        if self._status.done():
            return
        err = call_status(code, message, details)
        self._status.set_result(err)
        self.io.fail(err)
        if self._timer is not None:
            self._timer.cancel()
        self.session.calls.pop(self.sid, None)
        self.session.unblock(self.io)
        self.session.slot_freed()

    @property
    def done(self) -> bool:
        return self._status.done()

    async def send(self, message: Any, end_stream: bool = False) -> None:
        payload, compressed = compress(encode(message), self.threshold)
        try:
            await self.io.send_raw(payload, compressed, end_stream)
        except asyncio.CancelledError:  # abandoned while waiting for credit: abandon the call
            self.cancel()
            raise

    async def recv(self) -> Any:
        try:
            payload = await self.io.recv_raw()
            if payload is None:
                return None
            return decode(self.resp_type, payload)
        except DecodeError as exc:  # bad MessagePack, wrong types, or a corrupt compressed message
            self.cancel(Status.INTERNAL, f"undecodable response: {exc}")
            raise RpcError(Status.INTERNAL, f"undecodable response: {exc}") from None

    def close_send(self) -> None:
        if not self.done and self.sid in self.session.conn.streams:
            self.session.conn.end_stream(self.sid)
            self.session.schedule_flush()

    async def status(self) -> RpcError:
        """Wait for the final status; raises it unless OK."""
        err = await asyncio.shield(self._status)
        if err.status is not Status.OK:
            raise err
        return err

    def cancel(self, code: Status = Status.CANCELLED, message: str = "cancelled by the client",
               error: RpcError | None = None) -> None:
        """Reset the stream (the server's handler is cancelled)."""
        if self.done:
            return
        self.session.conn.reset_stream(self.sid, code, message)
        self.session.schedule_flush()
        err = error or RpcError(code, message)
        self.finish(err.status, err.message)

    def _expire(self) -> None:
        self.cancel(Status.DEADLINE_EXCEEDED, "deadline exceeded", Timeout())


class ClientSession(SessionBase):
    """The client's side of one connection, over any byte pipe."""

    def __init__(self, config: ClientConfig, write: Callable[[bytes], Any],
                 close_transport: Callable[[], Any]) -> None:
        super().__init__(Connection(Role.CLIENT, config.settings()), write, close_transport)
        self.config = config
        self.calls: dict[int, ClientCall] = {}
        self.hello: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        # A connect that gives up before HELLO (wrong ALPN, a timeout) never awaits it: mark
        # its failure as seen so asyncio does not print "exception was never retrieved".
        self.hello.add_done_callback(_seen)
        self._slot: asyncio.Future[None] | None = None
        self.goaway: RpcError | None = None

    def start(self) -> None:
        extra: dict[str, Any] = {"user_agent": self.config.user_agent}
        if self.config.token is not None:
            extra["token"] = self.config.token
        self.conn.send_hello(extra)
        self.flush()

    def data_received(self, data: bytes) -> None:
        events = self.conn.receive_data(data, self.loop.time())
        if self.debug:
            trace_events(events)
        for ev in events:
            match ev:
                case MessageReceived():
                    call = self.calls.get(ev.stream_id)
                    if call is not None:
                        call.io.feed(ev.payload, ev.compressed)
                case StatusReceived():
                    call = self.calls.get(ev.stream_id)
                    if call is not None:
                        call.finish(ev.code, ev.message, ev.details)
                case WindowUpdated():
                    self.window_updated(ev.stream_id)
                case StreamReset():
                    call = self.calls.get(ev.stream_id)
                    if call is not None:
                        call.finish(ev.code, ev.message)
                case HelloReceived():
                    if not self.hello.done():
                        self.hello.set_result(ev.settings)
                        self.start_keepalive()
                case GoAwayReceived():
                    self._goaway(ev)
                case ConnectionTerminated():
                    self.terminate(ev.code, ev.message)
                    return
        self.flush()

    def _goaway(self, ev: GoAwayReceived) -> None:
        err = error_for(ev.code or Status.UNAVAILABLE, ev.message or "server is going away")
        self.goaway = err
        if not self.hello.done():
            self.hello.set_exception(err)
        for sid, call in list(self.calls.items()):
            if sid > ev.last_stream_id:
                call.finish(Status.UNAVAILABLE, "stream refused: server is going away")
        self.slot_freed()

    def on_closed(self, error: RpcError) -> None:
        err = self.goaway if self.goaway is not None and self.goaway.status is not Status.OK else error
        if not self.hello.done():
            self.hello.set_exception(err)
        for call in list(self.calls.values()):
            call.finish(Status.UNAVAILABLE, err.message)
        self.slot_freed()

    def slot_freed(self) -> None:
        s = self._slot
        if s is not None and not s.done():
            s.set_result(None)

    async def open(self, method: str, resp_type: Any, timeout: float | None,
                   metadata: dict[str, str] | None) -> ClientCall:
        conn = self.conn
        while not conn.can_open_stream:
            if self.closed or conn.closed:
                raise ConnectionReset("connection is closed")
            if self.goaway is not None:
                raise RpcError(Status.UNAVAILABLE, f"server is going away: {self.goaway.message}")
            # One future shared by every waiter (each made its own, only the last was ever
            # woken); shielded so that one waiter's cancellation does not cancel the others.
            if self._slot is None or self._slot.done():
                self._slot = self.loop.create_future()
            await asyncio.shield(self._slot)
        timeout_ms = None if timeout is None else max(0, int(timeout * 1000))
        sid = conn.open_stream(method, metadata, timeout_ms)
        self.schedule_flush()  # the OPEN must go out even if the caller receives first
        call = ClientCall(self, sid, resp_type)
        self.calls[sid] = call
        if timeout is not None:
            call._timer = self.loop.call_later(timeout, call._expire)
        return call


class _StreamBase:
    def __init__(self, call: ClientCall) -> None:
        self._call = call

    @property
    def stream_id(self) -> int:
        return self._call.sid

    async def close(self) -> None:
        """Abandon the call: the server's handler is cancelled. Safe to call twice."""
        self._call.cancel()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ClientStream(_StreamBase, Generic[Req, Resp]):
    """Client streaming: ``send`` many, then ``close_and_receive`` the one response."""

    async def send(self, message: Req) -> None:
        await self._call.send(message)

    async def close_and_receive(self) -> Resp:
        return await _single_response(self._call)


async def _single_response(call: ClientCall, last: tuple[Any] | None = None) -> Any:
    """Unary and client streaming: send ``last`` as the final request (or half-close),
    then the one response and the status; a cancelled wait cancels the call."""
    try:
        if last is not None:
            await call.send(last[0], end_stream=True)
        elif not call.done:
            call.close_send()
        resp = await call.recv()
        await call.status()
    except asyncio.CancelledError:
        call.cancel()
        raise
    if resp is None:
        raise RpcError(Status.INTERNAL, "the server sent no response")
    return resp


class ServerStream(_StreamBase, Generic[Resp]):
    """Server streaming: ``await next()`` until None, or ``async for``."""

    async def next(self) -> Resp | None:
        try:
            return await self._call.recv()
        except asyncio.CancelledError:
            self._call.cancel()
            raise

    def __aiter__(self) -> ServerStream[Resp]:
        return self

    async def __anext__(self) -> Resp:
        msg = await self.next()
        if msg is None:
            raise StopAsyncIteration
        return msg


class BidirectionalStream(ServerStream[Resp], Generic[Req, Resp]):
    """Bidirectional: ``send``/``receive`` in any order, ``close_send`` to half-close."""

    async def send(self, message: Req) -> None:
        await self._call.send(message)

    async def receive(self) -> Resp | None:
        return await self.next()

    async def close_send(self) -> None:
        self._call.close_send()


def _seen(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _tls_failure(where: str, exc: ssl.SSLError) -> str:
    """One line for a failed TLS handshake, naming the likely cause."""
    reason = exc.reason or ""
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                  "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
        return (f"cannot connect to {where}: it does not speak TLS (a plaintext or HTTP port, "
                "e.g. the metrics port, or a server started with --insecure)")
    return f"cannot connect to {where}: TLS handshake failed: {reason or exc}"


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.session: ClientSession | None = None

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport
        self.session = ClientSession(self.config, transport.write, transport.close)
        self.session.start()

    def data_received(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        if not session.hello.done() and data.startswith(b"HTTP/"):
            session.terminate(Status.UNAVAILABLE, "the server answered in HTTP, not zrpc "
                              "(is it the metrics or web port?)")
            return
        session.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.connection_lost(exc)


class Client:
    """A zrpc client (see module docstring)."""

    def __init__(self, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig()
        self.session: ClientSession | None = None
        self._transport: asyncio.BaseTransport | None = None

    async def connect(self, address: str | Address, tls: TlsConfig | None = None) -> None:
        """Connect and complete the HELLO exchange.

        ``address`` is any form :func:`zrpc.address.parse_address` accepts
        (``localhost:8443``, ``:8443``, ``[::1]:8443``, ``zrpc://host:port``);
        ``quic://host:port`` selects the QUIC transport (UDP), ``zrpc://`` TLS over
        TCP, and an address without a scheme the config's ``transport`` (default
        ``"tls"``). A malformed address raises :class:`~zrpc.address.AddressError` (a
        ``ValueError``). ``tls`` defaults to :meth:`TlsConfig.client` (the
        system trust store plus the development CA if one exists; nothing is
        written).
        """
        addr = address if isinstance(address, Address) else parse_address(address)
        if self.config.transport == "quic" and isinstance(address, str) and "://" not in address:
            addr = Address("quic", addr.host, addr.port)  # no scheme: the configured transport
        tls = tls if tls is not None else TlsConfig.client()
        timeout = self.config.connect_timeout_ms / 1000
        where = addr.hostport
        try:
            async with asyncio.timeout(timeout):
                if addr.scheme == "quic":
                    await self._open_quic(addr, tls)
                else:
                    await self._open_tcp(addr, tls)
                assert self.session is not None
                await self.session.hello
        except TimeoutError:
            connected = self.session is not None
            await self.close()
            hint = " (connected, but no zrpc HELLO came back: is it the right port?)" if connected else ""
            raise RpcError(Status.UNAVAILABLE,
                           f"connecting to {where} timed out after {timeout:g}s{hint}") from None
        except ssl.SSLCertVerificationError as exc:
            await self.close()
            raise RpcError(Status.UNAVAILABLE, (
                f"cannot connect to {where}: its certificate is not trusted ({exc.verify_message}); "
                f"tried {tls.trust_description()}; pass the CA that signed the server's certificate "
                "(zrpc --ca FILE or ZRPC_CA; TlsConfig(ca_file=...) in Python)")) from None
        except ssl.SSLError as exc:
            await self.close()
            raise RpcError(Status.UNAVAILABLE, _tls_failure(where, exc)) from None
        except OSError as exc:
            await self.close()
            raise ConnectionReset(f"cannot connect to {where}: {exc.strerror or exc}") from None
        except RpcError:
            await self.close()
            raise

    async def _open_tcp(self, addr: Address, tls: TlsConfig) -> None:
        ctx = tls.client_context()
        transport, protocol = await asyncio.get_running_loop().create_connection(
            lambda: _ClientProtocol(self.config), addr.host, addr.port, ssl=ctx,
            server_hostname=(tls.server_hostname or addr.host) if ctx else None)
        self._transport = transport
        assert protocol.session is not None
        self.session = protocol.session
        if ctx is not None:  # before waiting for HELLO: a web port would never send one
            ssl_obj = transport.get_extra_info("ssl_object")
            if ssl_obj is not None and ssl_obj.selected_alpn_protocol() != ALPN_PROTOCOL:
                raise RpcError(Status.UNAVAILABLE, f"{addr.hostport} does not speak {ALPN_PROTOCOL} "
                               "(is it the web page's port?)")

    async def _open_quic(self, addr: Address, tls: TlsConfig) -> None:
        from zrpc.quic import connect_quic

        pipe, protocol = await connect_quic(addr.host, addr.port, tls, self.config.settings(),
                                            lambda: _ClientProtocol(self.config))
        self._transport = pipe  # type: ignore[assignment]
        assert isinstance(protocol, _ClientProtocol)
        self.session = protocol.session

    def use_session(self, session: ClientSession) -> None:
        """Run over an already connected session (in-memory transports)."""
        self.session = session

    async def close(self) -> None:
        """Close the connection; calls in flight end with UNAVAILABLE."""
        if self.session is not None and not self.session.closed:
            self.session.conn.close(Status.OK, "client closing")
            self.session.terminate(Status.CANCELLED, "client closed the connection")
        elif self._transport is not None:
            self._transport.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _session(self) -> ClientSession:
        if self.session is None or self.session.closed:
            raise ConnectionReset("not connected")
        return self.session

    def _timeout(self, timeout: float | None, streaming: bool) -> float | None:
        if timeout is not None:
            return timeout
        ms = self.config.stream_timeout_ms if streaming else self.config.request_timeout_ms
        return None if ms is None else ms / 1000

    async def _open(self, method: str, resp_type: Any, timeout: float | None,
                    metadata: dict[str, str] | None, streaming: bool) -> ClientCall:
        session = self._session()
        await session.hello
        return await session.open(method, resp_type, self._timeout(timeout, streaming), metadata)

    async def unary(self, method: str, request: Any, response_type: Any = None, *,
                    timeout: float | None = None, metadata: dict[str, str] | None = None) -> Any:
        """One request, one response."""
        call = await self._open(method, response_type, timeout, metadata, False)
        return await _single_response(call, (request,))

    async def client_stream(self, method: str, request_type: Any = None, response_type: Any = None,
                            *, timeout: float | None = None,
                            metadata: dict[str, str] | None = None) -> ClientStream[Any, Any]:
        """Many requests, one response. ``request_type`` documents what you send."""
        return ClientStream(await self._open(method, response_type, timeout, metadata, False))

    async def server_stream(self, method: str, request: Any, response_type: Any = None, *,
                            timeout: float | None = None,
                            metadata: dict[str, str] | None = None) -> ServerStream[Any]:
        """One request, many responses."""
        call = await self._open(method, response_type, timeout, metadata, True)
        await call.send(request, end_stream=True)
        return ServerStream(call)

    async def bidirectional_stream(self, method: str, request_type: Any = None,
                                   response_type: Any = None, *, timeout: float | None = None,
                                   metadata: dict[str, str] | None = None) -> BidirectionalStream[Any, Any]:
        """Many requests, many responses, in any order."""
        return BidirectionalStream(await self._open(method, response_type, timeout, metadata, True))
