"""The shard worker runtime: ZeroMQ links to brokers, virtual sessions, bus.

A worker serves shard k of N. For each broker it connects a DEALER, sends
READY (shard, methods, settings, bus endpoint) and then heartbeats; frames
tagged with a connection id are fed to one :class:`~zrpc.dispatch.ServerSession`
per client connection, so handlers run exactly as in the in-process server.
Room events are published once on a PUB socket (the fan-out bus); handlers'
``call.attach(topic, seq)`` tells the broker to deliver them to the stream.
A broker that stops answering heartbeats is declared dead: its sessions are
cancelled (handlers clean up, presence is updated) and the link reconnects
with backoff. The worker can also call methods through the broker
(:meth:`Worker.client`), which the chat batch uses for other shards' rooms.

With a shared store (PostgreSQL) :func:`serve` first waits as a standby until
this process holds the shard's lease (:mod:`workers.lease`); only then does it
build the app and register with the brokers, announcing its fencing token in
READY (a broker lets a higher token supersede the registered worker). A
worker that loses its lease stops and exits (:class:`LeaseLost`).
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
from cluster.curve import ClusterKeys, CurveGuard, is_tcp
from cluster.sharding import shard_for
from cluster.wire import trust_principal
from cluster.zmqio import SocketReader
from zrpc.client import Client, ClientSession
from zrpc.config import ClientConfig
from zrpc.dispatch import Dispatcher, ServerCall, ServerSession
from zrpc.service import Service
from zrpc.status import RpcError, Status

__all__ = ["App", "LeaseLost", "Worker", "WorkerConfig", "ZmqBus", "serve"]

log = logging.getLogger("zrpc.worker")


class App(Protocol):
    """What a worker serves: services plus the bus hooks."""

    def services(self) -> list[Service]: ...

    def replay(self, topic: str, after_seq: int, upto_seq: int | None) -> list[tuple[int, bytes]] | None: ...

    def drain_activity(self) -> dict[str, int]: ...

    async def close(self) -> None: ...


class ZmqBus:
    """Publishes room events once on the worker's PUB socket."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._send = sock.send_multipart
        self.dropped = 0

    def publish(self, topic: str, seq: int, payload: bytes) -> None:
        try:
            self._send([wire.topic_frame(topic), wire.SEQ.pack(seq), payload], zmq.NOBLOCK)
        except zmq.Again:  # a subscriber's queue is full: the broker repairs the gap from us
            self.dropped += 1


class BrokerLink:
    """One broker, seen from the worker."""

    def __init__(self, worker: Worker, endpoint: str) -> None:
        self.worker = worker
        self.endpoint = endpoint
        self.sessions: dict[bytes, ServerSession] = {}
        self.client_session: ClientSession | None = None
        self._sync: zmq.Socket[Any] | None = None
        self.reader: SocketReader
        self.last_heard = 0.0
        self.registered = asyncio.Event()

    def send(self, parts: list[bytes]) -> None:
        if self._sync is None:
            return
        try:
            self._sync.send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            log.debug("send to broker %s failed: %s", self.endpoint, exc)
        self.reader.kick()

    def _connect(self) -> None:
        w = self.worker
        sock: zmq.Socket[Any] = w.zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if w.curve is not None and is_tcp(self.endpoint):
            w.curve.client(sock, w.curve.keys.broker_public)
        sock.connect(self.endpoint)
        self._sync = sock
        self.reader = SocketReader(sock, self._handle)

    def _ready(self) -> None:
        self.send([wire.READY, msgpack.packb(self.worker.ready_info())])

    def drop_all(self) -> None:
        for s in list(self.sessions.values()):
            s.connection_lost(None)
        self.sessions.clear()
        if self.client_session is not None:
            self.client_session.connection_lost(None)
            self.client_session = None

    async def run(self) -> None:
        """READY, then heartbeat; a silent broker loses its sessions and we register again."""
        loop = asyncio.get_running_loop()
        cfg = self.worker.config
        interval = cfg.heartbeat_ms / 1000
        self._connect()
        self._ready()
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
                    self._ready()
            else:
                self._ready()  # until the broker answers (it may be starting or restarting)

    def _handle(self, msg: list[bytes]) -> bool:
        self.last_heard = self.reader.loop.time()
        cmd = msg[0]
        if cmd == wire.FRAMES:
            cid = msg[1]
            s = self.sessions.get(cid)
            if s is None:
                s = self._session(cid)
            s.data_received(msg[2])
        elif cmd == wire.HEARTBEAT:
            self.registered.set()
        elif cmd == wire.DISCONNECT:
            s = self.sessions.pop(msg[1], None)
            if s is not None:
                s.connection_lost(None)
        elif cmd == wire.GAP:
            topic, after, upto = msgpack.unpackb(msg[1])
            events = self.worker.app.replay(topic, after, upto)
            self.send([wire.REPAIR, msgpack.packb([topic, events])])
        elif cmd == wire.CLIENT:
            if self.client_session is not None:
                self.client_session.data_received(msg[1])
        elif cmd == wire.REFUSED:
            reason, fatal = wire.refusal(msg[1] if len(msg) > 1 else None)
            if fatal:
                self.worker.refused_for_good(reason)
                return True
            log.warning("broker %s refused us: %s; registering again", self.endpoint, reason)
            if self.registered.is_set():
                self.registered.clear()
                self.drop_all()
        return True

    def _session(self, cid: bytes) -> ServerSession:
        w = self.worker

        def write(data: bytes) -> None:
            self.send([wire.FRAMES, cid, data])

        def close() -> None:
            self.sessions.pop(cid, None)

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
    """One shard worker process (see module docstring)."""

    def __init__(self, config: WorkerConfig, app_factory: Callable[[Worker], App], *,
                 fence: tuple[int, int] | None = None) -> None:
        self.config = config
        self.fence = fence  # (shard, lease token) while serving a shared store
        self.zctx = zmq.Context()
        self.pub: zmq.Socket[Any] = self.zctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.bus = ZmqBus(self.pub)
        self.curve = (CurveGuard(self.zctx, ClusterKeys.load(config.cluster_keys, "worker"))
                      if config.cluster_keys else None)
        if self.curve is not None and is_tcp(config.bus):
            self.curve.serve(self.pub)
        self.routes: dict[ServerSession, tuple[BrokerLink, bytes]] = {}
        self.dispatcher = Dispatcher(config.server, bus=self.bus, attach=self._attach)
        self.fatal: str | None = None  # why a broker refused us for good (the process exits)
        self._stop: asyncio.Event | None = None
        self.links = [BrokerLink(self, ep) for ep in config.brokers]
        self.app = app_factory(self)
        for svc in self.app.services():
            self.dispatcher.add_service(svc)

    def ready_info(self) -> dict[str, Any]:
        cfg = self.config
        return {"version": wire.CLUSTER_VERSION, "shard": cfg.shard, "shards": cfg.shards,
                "pid": os.getpid(), "methods": self.dispatcher.describe(),
                "settings": {"version": 1, **cfg.server.settings().announce()}, "bus": cfg.bus,
                "agree": cfg.agreement(), **({"lease": self.fence[1]} if self.fence else {}),
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
        link.send([wire.ATTACH, cid, msgpack.packb([call.sid, topic, after_seq])])

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
        self.pub.bind(self.config.bus)
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
                if link._sync is not None:
                    link.reader.close()
                    link._sync.close(0)
            self.pub.close(0)
            if self.curve is not None:
                self.curve.close()
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
    worker = Worker(config, app_factory, fence=(config.shard, token))
    keeper = asyncio.create_task(lease.keep(stop))
    keeper.add_done_callback(lambda _: stop.set())  # a lost lease stops the worker
    try:
        await worker.run(stop)
    finally:
        kept = await keeper
        if kept:
            await lease.release()  # after the last write: a standby takes over at once
        else:
            await lease.close()
    if not kept:
        raise LeaseLost(f"lost the lease of shard {config.shard} (fencing token {token})")
    return worker.fatal
