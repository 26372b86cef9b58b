"""Server-side sessions: run handlers for the streams a connection opens.

:class:`Dispatcher` holds the registered methods and what every call needs
(config, bus, attach hook). :class:`ServerSession` is one connection's worth
of calls on top of a sans-IO :class:`~zrpc.protocol.Connection`; it is fed
bytes by whatever carries them: the in-process server's TLS socket, a
worker's ZeroMQ socket, or :mod:`zrpc.testing`'s in-memory pipe.
:class:`ServerCall` is the one generic stream object handlers see.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from zrpc.codec import DecodeError, compress, decode, encode
from zrpc.config import ServerConfig
from zrpc.context import RequestContext
from zrpc.fanout import Bus
from zrpc.packing import packb
from zrpc.protocol.connection import Connection, Role
from zrpc.protocol.events import (
    ConnectionTerminated,
    HelloReceived,
    MessageReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from zrpc.service import Cardinality, Method, MethodSpec, Service
from zrpc.session import SessionBase, StreamIO, trace_events
from zrpc.status import RpcError, Status, StreamClosed, call_status

__all__ = ["AttachHook", "Dispatcher", "ServerCall", "ServerSession"]

log = logging.getLogger("zrpc.server")

AttachHook = Callable[["ServerCall", str, int], None]
#: (hello fields, peer) -> (identity, claims); raise RpcError to refuse the connection.
#: One with a ``leeway`` attribute (zrpc.auth.JwtAuthenticator) also has the claims' ``exp``
#: enforced: the connection is closed with UNAUTHENTICATED when it passes.
Authenticator = Callable[[dict[str, Any], Any], tuple[str | None, dict[str, Any]]]


class Dispatcher:
    """Registered methods plus what every call needs."""

    def __init__(self, config: ServerConfig | None = None, *, bus: Bus | None = None,
                 attach: AttachHook | None = None,
                 detach: Callable[[ServerCall], None] | None = None) -> None:
        self.config = config or ServerConfig()
        self.methods: dict[str, Method] = {}
        self.bus = bus
        self.attach = attach
        self.detach = detach
        self.serving = True

    def add_service(self, service: Service) -> None:
        service.check_complete()
        for name, method in service.methods.items():
            if name in self.methods:
                raise ValueError(f"method {name} registered twice")
            self.methods[name] = method

    def describe(self) -> list[dict[str, Any]]:
        return [m.spec.describe() for m in self.methods.values()]

    def specs(self) -> list[MethodSpec]:
        return [m.spec for m in self.methods.values()]


class ServerCall:
    """The stream a handler works with: ``recv``/``async for``, ``send``, ``attach``."""

    __slots__ = ("_closed", "_deadline_timer", "_method", "_peer_gone", "_recv_type", "_task",
                 "_timed_out", "context", "io", "session", "sid", "topics")

    def __init__(self, session: ServerSession, sid: int, method: Method, context: RequestContext) -> None:
        self.session = session
        self.sid = sid
        self._method = method
        self._recv_type = method.spec.request_type
        self.context = context
        streams = session.dispatcher.config.stream_config
        self.io = StreamIO(session, sid, streams.max_buffered_messages, streams.max_buffered_bytes)
        self.io.on_abort = self.abort
        self._task: asyncio.Task[None] | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._peer_gone = False
        self._closed = asyncio.Event()
        self.topics: list[str] = []

    # --------------------------------------------------------- handler API
    async def recv(self) -> Any:
        """The next request message, or None when the client has finished sending."""
        payload = await self.io.recv_raw()
        if payload is None:
            return None
        return decode(self._recv_type, payload)

    receive = recv  # the streaming tutorial's name

    def __aiter__(self) -> ServerCall:
        return self

    async def __anext__(self) -> Any:
        msg = await self.recv()
        if msg is None:
            raise StopAsyncIteration
        return msg

    async def send(self, message: Any) -> None:
        """Send one response message (waits for flow-control credit)."""
        payload, compressed = compress(encode(message), self.session.dispatcher.config.stream_config.threshold)
        await self.io.send_raw(payload, compressed)

    def attach(self, topic: str, after_seq: int) -> None:
        """Deliver the events of ``topic`` published after ``after_seq`` to this stream."""
        hook = self.session.dispatcher.attach
        if hook is None:
            raise RpcError(Status.UNIMPLEMENTED, "this server has no fan-out bus")
        self.topics.append(topic)
        hook(self, topic, after_seq)

    async def wait_closed(self) -> None:
        """Wait until the stream ends (client cancel, disconnect, overflow)."""
        await self._closed.wait()

    # ------------------------------------------------------------ sink API
    def deliver(self, payload: bytes) -> bool:
        return self.io.push_nowait(payload)

    def abort(self, code: Status, message: str) -> None:
        """End the stream now with a status and stop the handler."""
        self.finish(code, message)
        self._peer_gone = True
        if self._task is not None:
            self._task.cancel()

    # ------------------------------------------------------------ lifecycle
    def finish(self, code: Status, message: str = "", details: Any = None) -> None:
        conn = self.session.conn
        if self.sid in conn.streams:
            if details is not None:
                try:  # un-encodable details must not lose the STATUS (the client would hang)
                    packb(details)
                except (TypeError, ValueError, OverflowError):
                    log.warning("%s: dropping status details that MessagePack cannot encode: %r",
                                self.context.method, details)
                    details = None
            try:
                conn.send_status(self.sid, code, message, details)
            except StreamClosed:
                pass
            self.session.schedule_flush()
        self.io.fail(call_status(code, message, details))
        self._closed.set()

    def peer_reset(self, code: int, message: str) -> None:
        self._peer_gone = True
        self.io.fail(RpcError(Status.coerce(code), message or "cancelled by the client"))
        self._closed.set()
        if self._task is not None:
            self._task.cancel()

    def expire(self) -> None:
        """The deadline passed: STATUS DEADLINE_EXCEEDED now, then stop the handler.

        The STATUS goes out here, not from the cancelled handler, so that a
        call whose task has not run yet (a deadline of 0) is still ended.
        """
        self._timed_out = True
        self.finish(Status.DEADLINE_EXCEEDED, "deadline exceeded")
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        spec = self._method.spec
        handler = self._method.handler
        ctx = self.context
        try:
            for interceptor in self.session.dispatcher.config.interceptors:
                await interceptor(ctx)
            card = spec.cardinality
            if card is Cardinality.UNARY or card is Cardinality.SERVER_STREAM:
                request = await self.recv()
                if request is None:
                    raise RpcError(Status.INVALID_ARGUMENT, f"{spec.name} expects one request message")
                if card is Cardinality.UNARY:
                    await self.send(await handler(request, ctx))
                else:
                    await handler(request, self)
            elif card is Cardinality.CLIENT_STREAM:
                await self.send(await handler(self))
            else:
                await handler(self)
            self.finish(Status.OK)
        except asyncio.CancelledError:
            if not self._timed_out and not self._peer_gone:
                self.finish(Status.UNAVAILABLE, "server is shutting down")
                raise
        except RpcError as exc:
            self.finish(exc.status, exc.message, exc.details)
        except DecodeError as exc:
            self.finish(Status.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            log.exception("handler for %s failed", spec.name)
            self.finish(Status.UNKNOWN, f"handler raised {type(exc).__name__}: {exc}")

    def done(self, task: asyncio.Task[None]) -> None:
        """The handler's task ended (also when it was cancelled before it first ran)."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self.session.call_done(self)


class ServerSession(SessionBase):
    """One connection's calls (see module docstring)."""

    def __init__(self, dispatcher: Dispatcher, write: Callable[[bytes], Any],
                 close_transport: Callable[[], Any], *, peer: str | None = None,
                 authenticator: Authenticator | None = None,
                 peer_settings: dict[str, Any] | None = None, relayed_peer: bool = False) -> None:
        cfg = dispatcher.config
        super().__init__(Connection(Role.SERVER, cfg.settings(), peer_settings=peer_settings),
                         write, close_transport, debug=cfg.enable_debug_logging)
        self.dispatcher = dispatcher
        self.peer = peer
        self.authenticator = authenticator
        #: a worker's session for one client connection of a broker: the HELLO's ``peer``
        #: field (the client's address as the broker saw it) replaces ``peer``
        self.relayed_peer = relayed_peer
        self.calls: dict[int, ServerCall] = {}
        self.idle = asyncio.Event()
        self.idle.set()
        self.hello_received = asyncio.Event()

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
                case WindowUpdated():
                    self.window_updated(ev.stream_id)
                case StreamOpened():
                    self._open(ev)
                case StreamEnded():
                    call = self.calls.get(ev.stream_id)
                    if call is not None:
                        call.io.feed_end()
                case StreamReset():
                    call = self.calls.get(ev.stream_id)
                    if call is not None:
                        call.peer_reset(ev.code, ev.message)
                case HelloReceived():
                    if not self._hello(ev.settings):
                        return
                case ConnectionTerminated():
                    self.terminate(ev.code, ev.message)
                    return
        self.flush()

    def _hello(self, settings: dict[str, Any]) -> bool:
        if not self.accept_hello(settings, self.authenticator):
            return False
        relayed = settings.get("peer")
        if self.relayed_peer and isinstance(relayed, str):
            self.peer = relayed  # a broker's virtual connection: the client's address as it saw it
        self.hello_received.set()
        return True

    def end_streams(self, code: Status, message: str) -> None:
        for call in list(self.calls.values()):
            call.abort(code, message)

    def _open(self, ev: StreamOpened) -> None:
        method = self.dispatcher.methods.get(ev.method)
        sid = ev.stream_id
        if method is None:
            if sid in self.conn.streams:  # a RESET in the same read may have ended it already
                self.conn.send_status(sid, Status.UNIMPLEMENTED, f"unknown method {ev.method!r}")
            return
        cfg = self.dispatcher.config
        timeout_ms = ev.timeout_ms if ev.timeout_ms is not None else cfg.request_timeout_ms
        deadline = None if timeout_ms is None else self.loop.time() + timeout_ms / 1000
        ctx = RequestContext(method=ev.method, metadata=ev.metadata, deadline=deadline,
                             peer=self.peer, identity=self.identity, claims=self.claims,
                             bus=self.dispatcher.bus)
        call = ServerCall(self, sid, method, ctx)
        ctx._cancelled = call._closed
        self.calls[sid] = call
        self.idle.clear()
        call._task = self.loop.create_task(call.run())
        call._task.add_done_callback(call.done)
        if timeout_ms == 0:  # already expired (docs/protocol.md section 10): never run the handler
            call.expire()
        elif deadline is not None:
            call._deadline_timer = self.loop.call_at(deadline, call.expire)

    def call_done(self, call: ServerCall) -> None:
        self.calls.pop(call.sid, None)
        if call.topics and self.dispatcher.detach is not None:
            self.dispatcher.detach(call)
        self.unblock(call.io)
        if not self.calls:
            self.idle.set()
        self.schedule_flush()

    def goaway(self) -> None:
        self.conn.goaway(Status.OK, "server is shutting down")
        self.flush()

    def on_closed(self, error: RpcError) -> None:
        for call in list(self.calls.values()):
            call.peer_reset(error.status, error.message)
