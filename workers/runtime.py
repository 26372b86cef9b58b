"""The shard worker runtime: links to brokers, virtual sessions, the event bus.

A worker serves shard k of N. For each broker it opens a link
(:class:`cluster.link.WorkerEnd`; ZeroMQ DEALER by default), sends READY
(shard, methods, settings, bus endpoint, session epoch) and then
heartbeats; frames tagged with a connection id are fed to one
:class:`~zrpc.dispatch.ServerSession` per client connection, so handlers run
exactly as in the in-process server. Room events are published once on the
worker's bus (:class:`cluster.link.EventPublisher`); handlers'
``call.attach(topic, seq)`` tells the broker to deliver them to the stream.

A broker silent for ``liveness`` heartbeats is declared dead: its sessions
are cancelled (handlers clean up, presence is updated), the session epoch
goes up, and the link is closed and opened afresh (Paranoid Pirate) before
READY is sent again, every heartbeat until the broker answers. The broker
sees the new epoch in READY and ends the client streams that were served by
the dropped sessions with UNAVAILABLE, so both sides agree; frames for a
connection this worker no longer knows, not starting with HELLO, are
answered with GONE instead of opening a session. Malformed messages from a
broker are logged and dropped. The worker can also call methods through
the broker (:meth:`Worker.client`), which the chat batch uses for other
shards' rooms.

With a shared store (PostgreSQL) :func:`serve` first waits as a standby until
this process holds the shard's lease (:mod:`workers.lease`); only then does it
build the app and register with the brokers, announcing its fencing token in
READY (a broker lets a higher token supersede the registered worker). A
worker that loses its lease, or that no broker has answered for two lease
lifetimes (cut off from the brokers but not from the database), stops, gives
the lease back if it still can, and exits (:class:`LeaseLost`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

import msgpack
import zmq

from cluster import wire
from cluster.config import WorkerConfig
from cluster.curve import ClusterKeys, CurveGuard
from cluster.link import EventPublisher, WorkerEnd
from cluster.sharding import shard_for
from cluster.streamlink import UnixWorkerEnd
from cluster.wire import trust_principal
from cluster.zmqlink import ZmqPublisher, ZmqWorkerEnd
from zrpc.client import Client, ClientSession
from zrpc.config import ClientConfig
from zrpc.dispatch import Dispatcher, ServerCall, ServerSession
from zrpc.packing import packb
from zrpc.protocol.frames import HEADER_SIZE, FrameType
from zrpc.service import Service
from zrpc.status import RpcError, Status

__all__ = ["App", "BrokerLink", "LeaseLost", "Worker", "WorkerConfig", "serve"]

log = logging.getLogger("zrpc.worker")


class App(Protocol):
    """What a worker serves: services plus the bus hooks."""

    def services(self) -> list[Service]: ...

    def replay(self, topic: str, after_seq: int, upto_seq: int | None) -> list[tuple[int, bytes]] | None: ...

    def drain_activity(self) -> dict[str, int]: ...

    async def close(self) -> None: ...


class BrokerLink:
    """One broker, seen from the worker."""

    def __init__(self, worker: Worker, endpoint: str, end: WorkerEnd) -> None:
        self.worker = worker
        self.endpoint = endpoint
        self.end = end
        self.sessions: dict[bytes, ServerSession] = {}
        self.client_session: ClientSession | None = None
        self.last_heard = 0.0
        self.epoch = 0                # goes up whenever this broker's sessions are dropped
        self.registered = asyncio.Event()
        self.malformed = 0            # messages from the broker dropped as malformed

    def send(self, parts: list[bytes]) -> None:
        self.end.send(parts)

    def _ready(self) -> None:
        self.send([wire.READY, msgpack.packb(self.worker.ready_info(self.epoch))])

    def drop_all(self) -> None:
        """Cancel every session of this broker (handlers clean up); a new epoch starts."""
        self.epoch += 1
        for s in list(self.sessions.values()):
            self.worker.routes.pop(s, None)
            s.connection_lost(None)
        self.sessions.clear()
        if self.client_session is not None:
            self.client_session.connection_lost(None)
            self.client_session = None

    def reconnect(self) -> None:
        """A fresh link (nothing queued for the old one is delivered), then READY."""
        self.end.open(self.handle)
        self._ready()

    async def run(self) -> None:
        """READY, then heartbeat; a silent broker loses its sessions and we register again."""
        loop = asyncio.get_running_loop()
        cfg = self.worker.config
        interval = cfg.heartbeat_ms / 1000
        self.reconnect()
        self.last_heard = loop.time()
        while True:
            await asyncio.sleep(interval)  # the heartbeat period itself
            now = loop.time()
            if self.registered.is_set():
                self.send([wire.HEARTBEAT, msgpack.packb(self.worker.activity())])
                if now - self.last_heard > interval * cfg.liveness:
                    log.warning("broker %s silent for %d heartbeats; cancelling its %d session(s)",
                                self.endpoint, cfg.liveness, len(self.sessions))
                    self.registered.clear()
                    self.drop_all()
                    self.reconnect()
            else:
                self._ready()  # until the broker answers (it may be starting or restarting)

    def handle(self, msg: list[bytes]) -> None:
        """One message from the broker; a malformed one is logged and dropped."""
        self.last_heard = asyncio.get_running_loop().time()
        try:
            self._dispatch(msg)
        except Exception as exc:  # never let one bad message take the worker's loop down
            self.malformed += 1
            log.warning("dropped a malformed %r message from broker %s: %s: %s",
                        msg[0][:16] if msg else b"", self.endpoint, type(exc).__name__, exc)

    def _dispatch(self, msg: list[bytes]) -> None:
        cmd, n = msg[0], len(msg)
        match cmd:
            case wire.FRAMES if n == 3:
                cid, data = msg[1], msg[2]
                s = self.sessions.get(cid)
                hello = len(data) >= HEADER_SIZE and data[4] == FrameType.HELLO
                if s is not None and hello:  # the broker opened this connection afresh
                    del self.sessions[cid]
                    self.worker.routes.pop(s, None)
                    s.connection_lost(None)
                    s = None
                if s is None:
                    if not hello:  # a connection whose session we dropped (the broker has not noticed yet)
                        self.send([wire.GONE, cid])
                        return
                    s = self._session(cid)
                s.data_received(data)
            case wire.HEARTBEAT:
                self.registered.set()
            case wire.DISCONNECT if n == 2:
                s = self.sessions.pop(msg[1], None)
                if s is not None:
                    self.worker.routes.pop(s, None)
                    s.connection_lost(None)
            case wire.GAP if n == 2:
                topic, after, upto = msgpack.unpackb(msg[1])
                events = self.worker.app.replay(str(topic), int(after), None if upto is None else int(upto))
                self.send([wire.REPAIR, msgpack.packb([topic, events])])
            case wire.CLIENT if n == 2:
                if self.client_session is not None:
                    self.client_session.data_received(msg[1])
            case wire.REFUSED:
                reason, fatal = wire.refusal(msg[1] if n > 1 else None)
                if fatal:
                    self.worker.refused_for_good(reason)
                    return
                log.warning("broker %s refused us: %s; registering again", self.endpoint, reason)
                if self.registered.is_set():
                    self.registered.clear()
                    self.drop_all()
            case _:
                raise ValueError(f"unknown command or {n} frame(s)")

    def _session(self, cid: bytes) -> ServerSession:
        w = self.worker

        def write(data: bytes) -> None:
            self.send([wire.FRAMES, cid, data])

        def close() -> None:
            if self.sessions.get(cid) is s:
                del self.sessions[cid]
            w.routes.pop(s, None)

        s = ServerSession(w.dispatcher, write, close, peer="broker", authenticator=trust_principal,
                          relayed_peer=True)
        self.sessions[cid] = s
        w.routes[s] = (self, cid)
        return s

    async def client(self) -> Client:
        """A client whose calls go through this broker."""
        s = self.client_session
        if s is None or s.closed:
            s = ClientSession(ClientConfig(request_timeout_ms=30_000, keepalive_interval_ms=None),
                              lambda data: self.send([wire.CLIENT, data]), lambda: None)
            self.client_session = s
            s.start()
        await s.hello
        c = Client()
        c.use_session(s)
        return c


class Worker:
    """One shard worker process (see module docstring).

    ``links(endpoint)`` and ``bus`` replace the ZeroMQ link ends (tests use
    in-memory ones); by default each broker gets a :class:`ZmqWorkerEnd` (a
    :class:`~cluster.streamlink.UnixWorkerEnd` for a ``unix://`` endpoint: the
    local link of the broker that spawned it) and the bus is a
    :class:`ZmqPublisher` bound at ``config.bus``.
    """

    def __init__(self, config: WorkerConfig, app_factory: Callable[[Worker], App], *,
                 links: Callable[[str], WorkerEnd] | None = None,
                 bus: EventPublisher | None = None, fence: tuple[int, int] | None = None) -> None:
        self.config = config
        self.fence = fence  # (shard, lease token) while serving a shared store
        self.zctx: zmq.Context[Any] | None = None
        self._publisher: ZmqPublisher | None = None
        self.curve: CurveGuard | None = None  # CurveZMQ on tcp:// links (--cluster-keys)
        if links is None or bus is None:
            ctx = self.zctx = zmq.Context()
            curve = self.curve = (CurveGuard(ctx, ClusterKeys.load(config.cluster_keys, "worker"))
                                  if config.cluster_keys else None)
            if bus is None:
                bus = self._publisher = ZmqPublisher(ctx, config.bus, curve)
            if links is None:
                def links(endpoint: str) -> WorkerEnd:
                    if endpoint.startswith("unix://"):  # the local link of a broker on this host
                        return UnixWorkerEnd(endpoint)
                    return ZmqWorkerEnd(ctx, endpoint, curve)
        self.bus: EventPublisher = bus
        make_end = links
        self.routes: dict[ServerSession, tuple[BrokerLink, bytes]] = {}
        self.dispatcher = Dispatcher(config.server, bus=self.bus, attach=self._attach)
        self.fatal: str | None = None  # why a broker refused us for good (the process exits)
        self._stop: asyncio.Event | None = None
        self.links = [BrokerLink(self, ep, make_end(ep)) for ep in config.brokers]
        self.app = app_factory(self)
        for svc in self.app.services():
            self.dispatcher.add_service(svc)

    def ready_info(self, epoch: int = 0) -> dict[str, Any]:
        cfg = self.config
        return {"version": wire.CLUSTER_VERSION, "shard": cfg.shard, "shards": cfg.shards,
                "pid": os.getpid(), "methods": self.dispatcher.describe(),
                "settings": {"version": 1, **cfg.server.settings().announce()}, "bus": cfg.bus,
                "agree": cfg.agreement(), "epoch": epoch,
                **({"lease": self.fence[1]} if self.fence else {}),
                **({"curve_key": self.curve.keys.public.decode()} if self.curve else {})}

    def activity(self) -> dict[str, int]:
        return self.app.drain_activity()

    def owns(self, key: str) -> bool:
        return shard_for(key, self.config.shards) == self.config.shard

    def _attach(self, call: ServerCall, topic: str, after_seq: int) -> None:
        route = self.routes.get(call.session)
        if route is None:
            raise RpcError(Status.INTERNAL, "stream is not attached to a broker")
        link, cid = route
        call.session.flush()  # what the handler sent so far must reach the broker before the attach
        link.send([wire.ATTACH, cid, packb([call.sid, topic, after_seq])])

    async def client(self) -> Client:
        """A client through the first registered broker."""
        for link in self.links:
            if link.registered.is_set():
                return await link.client()
        raise RpcError(Status.UNAVAILABLE, "no broker connection")

    def refused_for_good(self, reason: str) -> None:
        """A broker refused a misconfiguration that cannot heal: stop, and exit with the reason."""
        if self.fatal is None:
            self.fatal = reason
            log.error("broker refused this worker: %s; exiting", reason)
        if self._stop is not None:
            self._stop.set()

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        if self._publisher is not None:
            self._publisher.bind()
        tasks = [asyncio.create_task(link.run()) for link in self.links]
        log.info("worker shard %d/%d pid %d serving; bus %s; brokers %s", self.config.shard,
                 self.config.shards, os.getpid(), self.config.bus, ", ".join(self.config.brokers))
        try:
            await stop.wait()
        finally:
            for link in self.links:
                link.send([wire.BYE])
                link.drop_all()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Let cancelled handlers finish their cleanup (presence, user_left) before closing.
            await asyncio.sleep(0)
            await self.app.close()
            for link in self.links:
                link.end.close()
            self.bus.close()
            if self.curve is not None:
                self.curve.close()
            if self.zctx is not None:
                self.zctx.term()


class LeaseLost(Exception):
    """This worker lost its shard's lease (taken over, or the database unreachable)."""


async def serve(config: WorkerConfig, app_factory: Callable[[Worker], App],
                stop: asyncio.Event) -> str | None:
    """Run one worker until ``stop``; returns why a broker refused it for good, if so.

    With a PostgreSQL store, wait as a standby for the shard's lease first and
    serve only while holding it; raises :class:`LeaseLost` after a clean stop
    when it was lost.
    """
    if config.store_kind != "postgresql":
        worker = Worker(config, app_factory)
        await worker.run(stop)
        return worker.fatal
    from workers.lease import LeaseConfig, ShardLease

    hb = config.heartbeat_ms
    lease = ShardLease(LeaseConfig(config.store, config.shard, ttl_ms=hb * config.liveness,
                                   renew_ms=max(1, hb // 2), poll_ms=max(1, hb // 4)))
    token = await lease.acquire(stop)
    if token is None:
        return None
    import psycopg

    try:
        worker = Worker(config, app_factory, fence=(config.shard, token))
    except psycopg.OperationalError as exc:  # the database went away again: let a standby try
        await lease.release()
        raise LeaseLost(f"shard {config.shard}: the store could not be opened ({exc}); "
                        "gave the lease back") from None
    keeper = asyncio.create_task(lease.keep(stop))
    keeper.add_done_callback(lambda _: stop.set())  # a lost lease stops the worker
    alone = 2 * hb * config.liveness / 1000
    watcher = asyncio.create_task(_watch_brokers(worker, stop, alone))
    try:
        await worker.run(stop)
    finally:
        kept = await keeper
        cut_off = await watcher
        if kept:
            await lease.release()  # after the last write: a standby takes over at once
        else:
            await lease.close()
    if not kept:
        raise LeaseLost(f"lost the lease of shard {config.shard} (fencing token {token})")
    if cut_off:
        raise LeaseLost(f"no broker reachable for {alone:g} s: gave shard {config.shard} "
                        "to a standby")
    return worker.fatal


async def _watch_brokers(worker: Worker, stop: asyncio.Event, limit_s: float) -> bool:
    """Stop the worker (True) once no broker link has been registered for ``limit_s``:
    a lease holder that no broker can reach leaves the shard to a standby that can."""
    loop = asyncio.get_running_loop()
    last_ok = loop.time()
    while not stop.is_set():
        if any(link.registered.is_set() for link in worker.links):
            last_ok = loop.time()
        elif loop.time() - last_ok > limit_s:
            log.error("no broker has answered for %.1f s: giving shard %d to a standby",
                      limit_s, worker.config.shard)
            stop.set()
            return True
        try:
            await asyncio.wait_for(stop.wait(), limit_s / 8)
        except TimeoutError:
            pass
    return False
