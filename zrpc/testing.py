"""Testing helpers: a real client against a real server with no sockets, and a mock.

``connect_in_memory(server)`` wires a :class:`~zrpc.client.ClientSession` to a
:class:`~zrpc.dispatch.ServerSession` through an in-memory pipe: the same
protocol, flow control and handlers as over TLS, with no network.

:class:`MockServer` (the streaming tutorial's "Mock Streaming") answers calls from a script
of expectations, for testing client code alone::

    mock = MockServer()
    mock.expect_bidirectional_stream("Chat/JoinChat", [(join, ack), (msg, echo)])
    client = await mock.client()
    ...
    mock.verify()   # raises AssertionError listing what was not met
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from zrpc.client import Client, ClientSession
from zrpc.codec import to_wire
from zrpc.config import ClientConfig, ServerConfig
from zrpc.context import RequestContext
from zrpc.dispatch import Dispatcher, ServerCall, ServerSession
from zrpc.server import Server
from zrpc.service import Service
from zrpc.status import RpcError, Status

__all__ = ["MockServer", "connect_in_memory"]


def _pipe(loop: asyncio.AbstractEventLoop) -> tuple[Callable[[bytes], None], Callable[[Any], None]]:
    target: list[Any] = []

    def write(data: bytes) -> None:
        if target and target[0] is not None:
            loop.call_soon(_deliver, target[0], data)

    def set_target(session: Any) -> None:
        target[:] = [session]
    return write, set_target


def _deliver(session: Any, data: bytes) -> None:
    if not session.closed:
        session.data_received(data)


async def connect_in_memory(server: Server | Dispatcher, config: ClientConfig | None = None, *,
                            token: str | None = None) -> Client:
    """A connected :class:`Client` talking to ``server`` through memory."""
    loop = asyncio.get_running_loop()
    dispatcher = server.dispatcher if isinstance(server, Server) else server
    authenticator = server.authenticator if isinstance(server, Server) else None
    cfg = config or ClientConfig()
    if token is not None:
        from dataclasses import replace
        cfg = replace(cfg, token=token)
    to_server, set_server = _pipe(loop)
    to_client, set_client = _pipe(loop)
    holder: dict[str, Any] = {}

    def close_both() -> None:
        if isinstance(server, Server):  # as a socket's connection_lost does
            server.sessions.discard(holder["server"])
        for s in holder.values():
            if not s.closed:
                loop.call_soon(s.connection_lost, None)

    server_session = ServerSession(dispatcher, to_client, close_both, peer="in-memory",
                                   authenticator=authenticator)
    client_session = ClientSession(cfg, to_server, close_both)
    holder.update(server=server_session, client=client_session)
    if isinstance(server, Server):
        server.sessions.add(server_session)
    set_server(server_session)
    set_client(client_session)
    client_session.start()
    await client_session.hello
    client = Client(cfg)
    client.use_session(client_session)
    return client


class MockServer:
    """Scripted answers for client tests (see module docstring)."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.dispatcher = Dispatcher(config)
        self._services: dict[str, Service] = {}
        self.failures: list[str] = []
        self._pending: dict[str, list[Any]] = {}

    def _service(self, method: str) -> Service:
        name = method.partition("/")[0]
        svc = self._services.get(name)
        if svc is None:
            svc = self._services[name] = Service(name)
        return svc

    def _script(self, method: str, kind: str, script: Any) -> None:
        queue = self._pending.setdefault(method, [])
        queue.append(script)
        existing = self.dispatcher.methods.get(method)
        if existing is not None:  # handler bound by an earlier expectation (maybe already used)
            if existing.spec.cardinality.wire_name != kind:
                queue.pop()
                raise ValueError(f"{method} is already expected as "
                                 f"{existing.spec.cardinality.wire_name}, not {kind}")
            return
        short = method.partition("/")[2]
        svc = self._service(method)
        bind = getattr(svc, kind)(short, request=None, response=None)
        bind(self._handler(method, kind))
        self.dispatcher.methods[method] = svc.methods[method]

    def _next(self, method: str) -> Any:
        queue = self._pending.get(method)
        if not queue:
            self._fail(f"unexpected call to {method}")
        return queue.pop(0)  # type: ignore[union-attr]

    def _fail(self, why: str) -> None:
        self.failures.append(why)
        raise RpcError(Status.FAILED_PRECONDITION, f"mock: {why}")

    def _check(self, method: str, expected: Any, got: Any) -> None:
        if to_wire(expected) != got:
            self._fail(f"{method}: expected request {to_wire(expected)!r}, got {got!r}")

    def _handler(self, method: str, kind: str) -> Callable[..., Any]:
        async def unary(request: Any, ctx: RequestContext) -> Any:
            expected, response = self._next(method)
            self._check(method, expected, request)
            return response

        async def client_stream(call: ServerCall) -> Any:
            expected, response = self._next(method)
            got = [m async for m in call]
            if [to_wire(e) for e in expected] != got:
                self._fail(f"{method}: expected requests {[to_wire(e) for e in expected]!r}, got {got!r}")
            return response

        async def server_stream(request: Any, call: ServerCall) -> None:
            expected, responses = self._next(method)
            self._check(method, expected, request)
            for r in responses:
                await call.send(r)

        async def bidi(call: ServerCall) -> None:
            pairs = self._next(method)
            for sent, reply in pairs:
                got = await call.recv()
                if got is None:
                    self._fail(f"{method}: client ended the stream; expected {to_wire(sent)!r}")
                self._check(method, sent, got)
                if reply is not None:
                    await call.send(reply)

        handlers: dict[str, Callable[..., Any]] = {"unary": unary, "client_stream": client_stream, "server_stream": server_stream,
                "bidi": bidi}
        return handlers[kind]

    def expect_unary(self, method: str, request: Any, response: Any) -> None:
        self._script(method, "unary", (request, response))

    def expect_client_stream(self, method: str, requests: list[Any], response: Any) -> None:
        self._script(method, "client_stream", (requests, response))

    def expect_server_stream(self, method: str, request: Any, responses: list[Any]) -> None:
        self._script(method, "server_stream", (request, responses))

    def expect_bidirectional_stream(self, method: str, exchanges: list[tuple[Any, Any]]) -> None:
        """Each pair: what the client sends, then what the mock replies (None: no reply)."""
        self._script(method, "bidi", list(exchanges))

    async def client(self, config: ClientConfig | None = None) -> Client:
        return await connect_in_memory(self.dispatcher, config)

    def verify(self) -> None:
        """Raise AssertionError if a call did not match or an expectation was not used."""
        unmet = [f"{m}: {len(q)} expected call(s) never made" for m, q in self._pending.items() if q]
        problems = self.failures + unmet
        if problems:
            raise AssertionError("mock expectations not met:\n  " + "\n  ".join(problems))
