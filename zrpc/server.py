"""The in-process server: TLS (and QUIC) listeners, sessions, local fan-out, shutdown.

Serves the same services a shard worker serves, with no broker: for
development, tests, and single-process deployments::

    server = zrpc.Server(zrpc.ServerConfig())
    server.add_service(my_service)
    server.bind("127.0.0.1:8443", zrpc.TlsConfig.development())
    server.bind_quic("127.0.0.1:8443", zrpc.TlsConfig.development())  # optional: UDP, quic://
    await server.serve()

Built in: ``Health/Check`` (answers ``{"status": "SERVING"}``) and
``Reflection/List`` (the methods offered), so ``zrpc health`` and
``zrpc list`` work against it as against the broker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from zrpc.address import Address, parse_listen_address
from zrpc.config import ServerConfig
from zrpc.context import RequestContext
from zrpc.dispatch import Authenticator, Dispatcher, ServerCall, ServerSession
from zrpc.fanout import FanOut
from zrpc.limits import (
    ConnectionTimers,
    IpCounter,
    WritePauses,
    admit_connection,
    apply_budget,
    peer_name,
)
from zrpc.outbox import Ledger
from zrpc.service import Service
from zrpc.status import Status
from zrpc.tls import ALPN_PROTOCOL, TlsConfig, peer_identity

__all__ = ["LocalBus", "Server", "builtin_services"]

log = logging.getLogger("zrpc.server")
#: How long a closing connection may take to finish the TLS close before it is aborted.


class LocalBus:
    """In-process bus: publish straight into the server's fan-out."""

    def __init__(self, fanout: FanOut) -> None:
        self.fanout = fanout

    def publish(self, topic: str, seq: int, payload: bytes) -> None:
        self.fanout.publish(topic, seq, payload)


def builtin_services(dispatcher: Dispatcher, serving: Any = None) -> Service:
    """``Health/Check`` and ``Reflection/List`` for a dispatcher."""
    svc = Service("Health")

    @svc.unary("Check", request=dict, response=dict)
    async def check(request: Any, ctx: RequestContext) -> dict[str, Any]:
        ok = dispatcher.serving if serving is None else serving()
        return {"status": "SERVING" if ok else "NOT_SERVING"}

    refl = Service("Reflection")

    @refl.unary("List", request=dict, response=dict)
    async def list_methods(request: Any, ctx: RequestContext) -> dict[str, Any]:
        return {"methods": dispatcher.describe()}

    svc.methods.update(refl.methods)
    svc.spec.methods.update(refl.spec.methods)
    return svc


class _ServerProtocol(WritePauses, asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.session: ServerSession | None = None
        self.transport: asyncio.Transport | None = None
        self._timers: ConnectionTimers | None = None
        self._ip: str | None = None  # counted in server.per_ip while set

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport
        self.transport = transport
        server = self.server
        cfg = server.config
        ip = admit_connection(transport, serving=server.dispatcher.serving,
                              open_connections=len(server.sessions),
                              max_connections=cfg.max_connections, per_ip=server.per_ip)
        if ip is None:
            return
        self._ip = ip
        peer = peer_name(transport)
        session = ServerSession(server.dispatcher, transport.write, self._close_transport, peer=peer,
                                authenticator=server.authenticator)
        apply_budget(session, transport, cfg.max_connection_buffer, server.buffers,
                     lambda: server.sessions)
        ssl_obj = transport.get_extra_info("ssl_object")
        cert_identity = peer_identity(ssl_obj) if ssl_obj is not None else None
        if cert_identity is not None:
            session.identity = cert_identity
        self.session = session
        server.sessions.add(session)
        self._timers = ConnectionTimers(session, cfg, session.hello_received.is_set)

    def _release(self) -> None:
        """Free the connection's per-IP slot and timers (once)."""
        if self._ip is not None:
            self.server.per_ip.release(self._ip)
            self._ip = None
        if self._timers is not None:
            self._timers.stop_idle()

    def _close_transport(self) -> None:
        """The session is over: free its slot now and close the socket.

        A peer that stopped reading (what keepalive detects) never completes the
        TLS close; without the abort it would hold the socket (and, before the
        discard, a ``max_connections`` slot) for the transport's 30 s shutdown timeout.
        """
        if self.session is not None:
            self.server.sessions.discard(self.session)
        self._release()
        if self._timers is not None:
            self._timers.close(self.transport)

    def data_received(self, data: bytes) -> None:
        s = self.session
        if s is not None:
            s.data_received(data)
            if self._timers is not None:
                self._timers.check_hello()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timers is not None:
            self._timers.cancel()
        self._release()
        if self.session is not None:
            self.session.connection_lost(exc)
            self.server.sessions.discard(self.session)


class Server:
    """The in-process server (see module docstring)."""

    def __init__(self, config: ServerConfig | None = None, *,
                 authenticator: Authenticator | None = None) -> None:
        self.config = config or ServerConfig()
        self.fanout = FanOut()
        self.bus = LocalBus(self.fanout)
        self.dispatcher = Dispatcher(self.config, bus=self.bus, attach=self._attach,
                                     detach=self._detach)
        self.dispatcher.add_service(builtin_services(self.dispatcher))
        self.authenticator = authenticator or self.config.authenticator
        self.sessions: set[ServerSession] = set()
        self.per_ip = IpCounter(self.config.max_connections_per_ip)
        #: bytes waiting for all clients, bounded by ``max_buffer_memory`` (zrpc/limits.py)
        self.buffers = Ledger(self.config.max_buffer_memory)
        self._binds: list[tuple[Address, TlsConfig]] = []
        self._servers: list[asyncio.Server] = []
        self._quic_binds: list[tuple[Address, TlsConfig]] = []
        self._quic: list[Any] = []  # zrpc.quic.QuicListener (aioquic is imported only when used)
        self.quic_addresses: list[tuple[str, int]] = []
        self._stopped: asyncio.Event | None = None

    # ---------------------------------------------------------- services
    def add_service(self, service: Service) -> None:
        self.dispatcher.add_service(service)

    register_service = add_service

    def _attach(self, call: ServerCall, topic: str, after_seq: int) -> None:
        self.fanout.attach(topic, call, after_seq)
        call.context.bus = self.bus

    def _detach(self, call: ServerCall) -> None:
        for topic in call.topics:
            self.fanout.detach(topic, call)

    # ----------------------------------------------------------- running
    def bind(self, address: str, tls: TlsConfig | None = None) -> None:
        """Listen on ``host:port`` (port 0 picks a free one); TLS defaults to development certs.

        ``address`` takes the forms of :func:`zrpc.address.parse_listen_address`
        (a malformed one raises :class:`~zrpc.address.AddressError` here).
        """
        addr = parse_listen_address(address)
        tls = tls if tls is not None else TlsConfig.development()
        (self._quic_binds if addr.scheme == "quic" else self._binds).append((addr, tls))

    def bind_quic(self, address: str, tls: TlsConfig | None = None) -> None:
        """Listen for zrpc over QUIC on UDP ``host:port`` (same certificates, limits, auth).

        The same as ``bind("quic://host:port")``. The bound addresses are in
        :attr:`quic_addresses` after :meth:`start`.
        """
        addr = parse_listen_address(address)
        self.bind(f"quic://{addr.hostport}", tls)

    async def start(self) -> list[tuple[str, int]]:
        """Open the listeners; returns the bound TLS/TCP (host, port) pairs."""
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        bound = []
        for addr, tls in self._binds:
            ctx = tls.server_context()
            srv = await loop.create_server(
                lambda: _ServerProtocol(self), addr.host, addr.port, ssl=ctx, backlog=1024,
                ssl_handshake_timeout=self.config.handshake_timeout_ms / 1000 if ctx else None)
            self._servers.append(srv)
            for sock in srv.sockets:
                name = sock.getsockname()
                bound.append((name[0], name[1]))
        for host, port in bound:
            log.info("zrpc server listening on %s:%d (ALPN %s)", host, port, ALPN_PROTOCOL)
        self.addresses = bound
        if self._quic_binds:
            from zrpc.quic import serve_quic

            cfg = self.config
            for addr, tls in self._quic_binds:
                listener = await serve_quic(addr.host, addr.port, tls, cfg.settings(), lambda: _ServerProtocol(self),
                                            handshake_timeout=cfg.handshake_timeout_ms / 1000,
                                            max_connections=cfg.max_connections)
                self._quic.append(listener)
                self.quic_addresses.append(listener.address)
                log.info("zrpc server listening on quic://%s:%d (UDP, ALPN %s)", *listener.address, ALPN_PROTOCOL)
        return bound

    async def serve(self) -> None:
        """Start (if needed) and run until :meth:`shutdown`."""
        if not self._servers and not self._quic:
            await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    async def shutdown(self, grace: float | None = None) -> None:
        """GOAWAY to every connection; in-flight calls finish within ``grace`` seconds."""
        grace = self.config.shutdown_grace_ms / 1000 if grace is None else grace
        self.dispatcher.serving = False
        for srv in self._servers:
            srv.close()
        for listener in self._quic:
            listener.stop_accepting()
        for s in list(self.sessions):
            s.goaway()
        idle = [s.idle.wait() for s in self.sessions]
        if idle:
            try:
                async with asyncio.timeout(grace):
                    await asyncio.gather(*idle)
            except TimeoutError:
                log.warning("shutdown grace of %.1fs expired; cancelling remaining calls", grace)
        for s in list(self.sessions):
            for call in list(s.calls.values()):
                call.abort(Status.UNAVAILABLE, "server shut down")
            s.flush()
            s.conn.close(Status.UNAVAILABLE, "server shut down")
            s.terminate(Status.UNAVAILABLE, "server shut down")
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()
        for listener in self._quic:
            listener.close()
        self._quic.clear()
        if self._stopped is not None:
            self._stopped.set()
