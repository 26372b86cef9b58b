"""The broker process: TLS edge + ZeroMQ ROUTER to workers + SUB to the bus.

``Broker.start()`` binds the client listener and the workers' ROUTER
endpoint, connects a SUB socket to each registered worker's PUB, and (with
``workers > 0``) spawns and supervises the shard workers. Everything runs on
one event loop (uvloop in production); ZeroMQ sockets are drained without
awaiting per message, and every session's output is coalesced into one
write per loop iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from broker.activity import Activity
from broker.edge import EdgeProtocol, EdgeSession
from broker.metrics import BrokerMetrics
from broker.registry import Refusal, WorkerInfo, WorkerRegistry
from broker.rundir import make_runtime_dir
from broker.supervisor import Supervisor
from broker.web import WebServer
from cluster import wire
from cluster.config import DEFAULT_APP, WorkerConfig, mismatch
from cluster.curve import ClusterKeys, CurveGuard, check_endpoint, is_tcp
from cluster.link import BrokerEnd
from cluster.sharding import shard_for
from cluster.streamlink import LocalBrokerEnd
from cluster.zmqlink import ZmqBrokerEnd
from zrpc import defaults
from zrpc.address import AddressError, parse_listen_address
from zrpc.config import ServerConfig
from zrpc.dispatch import Authenticator
from zrpc.fanout import FanOut
from zrpc.limits import IpCounter
from zrpc.memory import Trimmer, tune_allocator
from zrpc.outbox import Ledger
from zrpc.status import Status
from zrpc.tls import TlsConfig, zrpc_home

__all__ = ["Broker", "BrokerConfig", "StartupError"]

log = logging.getLogger("zrpc.broker")
#: Seconds (at least one liveness period) a worker declared dead may stay silent before it is
#: killed and replaced.
HUNG_GRACE_S = 5.0


class StartupError(Exception):
    """The broker cannot start: one line naming the option (``--listen HOST:PORT: address in use``)."""


@contextlib.contextmanager
def _startup_step(option: str, value: object) -> Iterator[None]:
    """Turn a failed bind or an unreadable file into a :class:`StartupError` naming ``option``."""
    try:
        yield
    except (OSError, ValueError, zmq.ZMQError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StartupError(f"{option} {value}: {reason}") from None


@dataclass(frozen=True)
class BrokerConfig:
    listen: str = defaults.LISTEN
    quic_listen: str | None = None            # UDP HOST:PORT for zrpc over QUIC (same TLS, limits, auth)
    tls: TlsConfig | None = None              # None: development TLS under ZRPC_HOME
    workers: int = defaults.WORKERS                          # workers to spawn and supervise (0: external only)
    shards: int | None = None                 # default: workers (required when workers == 0)
    data_dir: str | None = None               # default: $ZRPC_HOME/data
    runtime_dir: str | None = None            # ipc:// endpoints live here (default: a temp dir)
    router: str | None = None                 # endpoint workers connect to (default ipc://)
    heartbeat_ms: int = defaults.HEARTBEAT_MS
    liveness: int = defaults.LIVENESS
    server: ServerConfig = field(default_factory=ServerConfig)
    metrics_port: int | None = None
    web_port: int | None = None               # HTTPS chat page + zrpc over WebSocket (broker/web.py)
    web_origins: tuple[str, ...] = ()         # origins besides the page's own allowed to open /zrpc
    log_level: str = defaults.LOG_LEVEL
    app: str = DEFAULT_APP                    # module:function the spawned workers serve
    app_options: dict[str, Any] = field(default_factory=dict)  # passed to the app (chat rate limits)
    store: str = ""                           # history store URL for the workers ("" = data_dir)
    cluster_keys: str | None = None           # CurveZMQ key set for tcp:// links (cluster/curve.py)
    local_link: str = defaults.LOCAL_LINK     # spawned workers' link: "unix" stream socket or "zmq"
    cluster_insecure: bool = False            # allow plaintext tcp:// off loopback
    log_summary_interval_s: float = 60.0      # the INFO activity line (broker/activity.py); 0: off

    def worker_config(self, shard: int, router: str, runtime_dir: str, data_dir: str) -> WorkerConfig:
        """What a worker this broker spawns for ``shard`` is given (``zrpc-worker --config``);
        ``router`` is the endpoint it links to (``unix://`` for the local stream link)."""
        srv = self.server
        return WorkerConfig(shard=shard, shards=self.shard_count, brokers=(router,),
                            bus=f"ipc://{runtime_dir}/bus-{shard}.ipc", data_dir=data_dir,
                            heartbeat_ms=self.heartbeat_ms, liveness=self.liveness, app=self.app,
                            log_level=self.log_level, max_message_size=srv.max_message_size,
                            stream_window=srv.stream_config.buffer_size,
                            max_buffered_messages=srv.stream_config.max_buffered_messages,
                            app_options=dict(self.app_options), store=self.store,
                            cluster_keys=self.cluster_keys or "",
                            cluster_insecure=self.cluster_insecure)

    @property
    def shard_count(self) -> int:
        n = self.shards if self.shards is not None else self.workers
        if n < 1:
            raise ValueError("--shards is required when --workers is 0")
        return n


class Broker:
    """The front process (see module docstring)."""

    def __init__(self, config: BrokerConfig | None = None, *,
                 authenticator: Authenticator | None = None, link: BrokerEnd | None = None) -> None:
        self.config = config or BrokerConfig()
        self.server_config = self.config.server
        self.shards = self.config.shard_count
        self.authenticator = authenticator or self.config.server.authenticator
        interval = self.config.heartbeat_ms / 1000
        self.registry = WorkerRegistry(self.shards, interval, self.config.liveness)
        self.fanout = FanOut(on_gap=self._gap, on_empty=self.unsubscribe)
        self.metrics = BrokerMetrics(Activity(log, self.config.log_summary_interval_s))
        self.trimmer = Trimmer()  # gives closed connections' native memory back (zrpc/memory.py)
        self.sessions: dict[bytes, EdgeSession] = {}
        self.per_ip = IpCounter(self.config.server.max_connections_per_ip)
        #: bytes waiting for all clients, bounded by ``max_buffer_memory`` (zrpc/limits.py)
        self.buffers = Ledger(self.config.server.max_buffer_memory)
        self.internal: dict[bytes, EdgeSession] = {}
        self.local_methods: dict[str, Any] = {
            "Health/Check": self._health,
            "Reflection/List": self._reflection,
        }
        self.stopping = False
        self.fatal: str | None = None           # why the broker cannot go on (a worker cannot start)
        self.failed = asyncio.Event()           # set with ``fatal``: the owner shuts the broker down
        self._cids = itertools.count(1)
        self.link: BrokerEnd | None = link    # the workers' link (ZeroMQ unless given)
        self.zctx: zmq.Context[Any] | None = None
        self.curve: CurveGuard | None = None  # CurveZMQ on tcp:// links (--cluster-keys)
        self._malformed = 0                    # worker messages dropped as malformed
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.AbstractServer | None = None
        self._stopped = asyncio.Event()
        self._ready_changed = asyncio.Event()
        self._own_runtime: str | None = None
        self.supervisor: Supervisor | None = None
        self.address: tuple[str, int] | None = None
        self.quic: Any = None                      # zrpc.quic.QuicListener when --quic-listen is on
        self.quic_address: tuple[str, int] | None = None
        self.router_endpoint = ""
        self.web: WebServer | None = None

    # ------------------------------------------------------------ builtins
    def _health(self, request: Any) -> dict[str, Any]:
        """SERVING, or NOT_SERVING with ``reason`` (and ``missing_shards``: shards with no live worker)."""
        missing = [k for k in range(self.shards) if self.registry.for_shard(k) is None]
        if self.stopping:
            return {"status": "NOT_SERVING", "reason": "the broker is shutting down"}
        if missing:
            return {"status": "NOT_SERVING", "missing_shards": missing,
                    "reason": f"no live worker for shard(s) {', '.join(map(str, missing))} "
                              f"of {self.shards}"}
        return {"status": "SERVING"}

    def _reflection(self, request: Any) -> dict[str, Any]:
        methods = [{"name": n, "kind": "unary", "shard_key": None, "request": "dict", "response": "dict"}
                   for n in self.local_methods]
        seen = set()
        for w in self.registry.by_identity.values():
            for m in w.methods:
                if m["name"] not in seen:
                    seen.add(m["name"])
                    methods.append(m)
        return {"methods": methods}

    def next_cid(self) -> bytes:
        return next(self._cids).to_bytes(8, "big")

    # ------------------------------------------------------------- startup
    async def start(self) -> tuple[str, int]:
        cfg = self.config
        tune_allocator()
        loop = asyncio.get_running_loop()
        runtime = cfg.runtime_dir
        if runtime is None:
            runtime = self._own_runtime = make_runtime_dir()
        Path(runtime).mkdir(parents=True, exist_ok=True)
        self.runtime_dir = runtime
        if self.link is None:
            self.zctx = zmq.Context()
            if cfg.cluster_keys:
                with _startup_step("--cluster-keys", cfg.cluster_keys):
                    self.curve = CurveGuard(self.zctx, ClusterKeys.load(cfg.cluster_keys, "broker"))
            self.link = ZmqBrokerEnd(self.zctx, cfg.router or f"ipc://{runtime}/broker.ipc", self.curve)
            if cfg.local_link not in ("unix", "zmq"):
                raise StartupError(f"--local-link {cfg.local_link}: choose unix or zmq")
            if cfg.local_link == "unix" and cfg.workers > 0:
                self.link = LocalBrokerEnd(self.link, f"{runtime}/link.sock")
        self.router_endpoint = self.link.endpoint
        with _startup_step("--router", self.router_endpoint):
            check_endpoint("--router", self.router_endpoint, self.curve is not None,
                           cfg.cluster_insecure)
            self.link.start(self._on_worker, self._on_event)
        self._tasks.append(loop.create_task(self._heartbeat()))
        self._tasks.append(loop.create_task(self.metrics.activity.run(
            lambda: len(self.sessions) - len(self.internal))))
        tls = cfg.tls if cfg.tls is not None else TlsConfig.development()
        with _startup_step("--cert", tls.cert_file):
            ctx = tls.server_context()
        with _startup_step("--listen", cfg.listen):
            listen = parse_listen_address(cfg.listen)
            if listen.scheme != "zrpc":
                raise AddressError("TLS over TCP only; use --quic-listen for QUIC")
            host, port = listen.host, listen.port
            self._server = await loop.create_server(
                lambda: EdgeProtocol(self), host, port, ssl=ctx, backlog=1024,
                ssl_handshake_timeout=cfg.server.handshake_timeout_ms / 1000 if ctx else None)
        name = self._server.sockets[0].getsockname()
        self.address = (name[0], name[1])
        if cfg.quic_listen is not None:
            with _startup_step("--quic-listen", cfg.quic_listen):
                await self._start_quic(cfg.quic_listen, tls)
        if cfg.web_port is not None:
            self.web = WebServer(lambda: EdgeProtocol(self, websocket=True), cfg.server, WebServer.context_for(ctx, tls),
                                 host, cfg.web_port, cfg.web_origins)
            with _startup_step("--web-port", cfg.web_port):
                await self.web.start()
        if cfg.metrics_port is not None:
            self.metrics.bind(self.fanout, live_workers=lambda: len(self.registry.by_identity),
                              connections=lambda: len(self.sessions))
            with _startup_step("--metrics-port", cfg.metrics_port):
                self.metrics.serve(cfg.metrics_port)
            log.info("metrics on http://127.0.0.1:%d/metrics", cfg.metrics_port)
        if cfg.workers > 0:
            data_dir = cfg.data_dir or str(zrpc_home() / "data")
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            spawned = getattr(self.link, "local_endpoint", None) or self.router_endpoint
            configs = [cfg.worker_config(k, spawned, runtime, data_dir)
                       for k in range(min(cfg.workers, self.shards))]
            self.supervisor = Supervisor(configs, self._worker_exited, self._give_up)
            await self.supervisor.start()
        local = getattr(self.link, "local_endpoint", None)
        log.info("broker listening on %s:%d (%s), workers connect to %s, %d shard(s)",
                 self.address[0], self.address[1], "TLS" if ctx else "PLAINTEXT",
                 f"{self.router_endpoint} (spawned ones to {local})" if local else self.router_endpoint,
                 self.shards)
        return self.address

    async def _start_quic(self, address: str, tls: TlsConfig) -> None:
        from zrpc.quic import serve_quic

        addr = parse_listen_address(address)
        server = self.config.server
        self.quic = await serve_quic(addr.host, addr.port, tls, server.settings(), lambda: EdgeProtocol(self),
                                     handshake_timeout=server.handshake_timeout_ms / 1000,
                                     max_connections=server.max_connections)
        self.quic_address = self.quic.address
        log.info("broker listening on quic://%s:%d (UDP)", *self.quic_address)

    async def registry_ready(self) -> None:
        """Wait until every shard has a live worker."""
        while not self.registry.all_shards_owned():
            self._ready_changed.clear()
            await self._ready_changed.wait()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # ------------------------------------------------------------- workers
    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        assert self.link is not None
        self.link.send(identity, frames)
        self.metrics.frames_to_workers += 1

    def send_frames(self, identity: bytes, cid: bytes, data: bytes) -> None:
        self._send(identity, [wire.FRAMES, cid, data])

    def disconnect_upstream(self, identity: bytes, cid: bytes) -> None:
        self._send(identity, [wire.DISCONNECT, cid])

    def _on_worker(self, identity: bytes, msg: list[bytes]) -> None:
        """One message from a worker; a malformed one is logged and dropped."""
        self.metrics.frames_from_workers += 1
        try:
            self._dispatch(identity, msg)
        except Exception as exc:  # a worker bug must never take the broker's loop down
            self._malformed += 1
            log.warning("dropped a malformed %r message from worker %s: %s: %s",
                        msg[0][:16] if msg else b"", identity.hex(), type(exc).__name__, exc)

    def _dispatch(self, identity: bytes, msg: list[bytes]) -> None:
        now = asyncio.get_running_loop().time()
        cmd, n = msg[0], len(msg)
        if cmd == wire.READY:
            self._ready(identity, msg, now)
            return
        worker = self.registry.heard(identity, now)
        if worker is None:
            if cmd != wire.BYE:  # a worker we never registered (or refused) may just leave
                self._send(identity, [wire.REFUSED, wire.refused("unknown worker: send READY", fatal=False)])
            return
        match cmd:
            case wire.FRAMES if n == 3:
                edge = self.sessions.get(msg[1])
                if edge is not None:
                    edge.from_worker(identity, msg[2])
                else:
                    self._send(identity, [wire.DISCONNECT, msg[1]])
            case wire.HEARTBEAT if n <= 2:
                tails = msgpack.unpackb(msg[1]) if n == 2 else {}
                for topic, seq in tails.items():
                    self.fanout.observe(str(topic), int(seq))
            case wire.ATTACH if n == 3:
                edge = self.sessions.get(msg[1])
                if edge is not None:
                    sid, topic, after = msgpack.unpackb(msg[2])
                    edge.attach(identity, int(sid), str(topic), int(after))
            case wire.REPAIR if n == 2:
                topic, events = msgpack.unpackb(msg[1])
                self.fanout.repair(str(topic), None if events is None else [(int(s), bytes(p)) for s, p in events])
            case wire.CLIENT if n == 2:
                self._internal(identity).data_received(msg[1])
            case wire.GONE if n == 2:
                edge = self.sessions.get(msg[1])
                if edge is not None:
                    edge.worker_lost(identity, f"worker for shard {worker.shard} dropped this "
                                               "connection's calls; retry")
            case wire.BYE:
                w = self.registry.remove(identity)
                if w is not None:
                    self._worker_dead(w, f"worker for shard {w.shard} stopped")
            case _:
                raise ValueError(f"unknown command or {n} frame(s)")

    def _ready(self, identity: bytes, msg: list[bytes], now: float) -> None:
        cfg = self.config
        try:
            info = msgpack.unpackb(msg[1]) if len(msg) > 1 else {}
            if not isinstance(info, dict) or info.get("version") != wire.CLUSTER_VERSION:
                raise Refusal(f"unsupported cluster version {info.get('version') if isinstance(info, dict) else None!r}",
                              fatal=True)
            agree = info.get("agree")
            why = mismatch(agree if isinstance(agree, dict) else {}, heartbeat_ms=cfg.heartbeat_ms,
                           liveness=cfg.liveness, max_message_size=cfg.server.max_message_size)
            if why is not None:
                raise Refusal(why, fatal=True)
            bus_key = self._bus_key(info)
            old = self.registry.by_identity.get(identity)
            if old is not None and old.epoch != info.get("epoch", 0):
                # The worker dropped this broker's sessions (it heard nothing from us for its
                # liveness: we stalled): end the streams they served, as the worker did.
                self._worker_dead(old, f"worker for shard {old.shard} dropped this broker's "
                                       "sessions (it heard no heartbeat in time)", died=False)
            self._replaced(identity, info)
            shard = info.get("shard")
            prev = self.registry.for_shard(shard) if type(shard) is int else None
            w = self.registry.register(identity, info, now)
        except (ValueError, TypeError, KeyError) as exc:
            fatal = isinstance(exc, Refusal) and exc.fatal
            log.warning("refusing worker%s: %s", " for good" if fatal else "", exc)
            self._send(identity, [wire.REFUSED, wire.refused(str(exc), fatal=fatal)])
            return
        self._ready_changed.set()
        if prev is not None and prev.identity != identity:  # it lost its shard lease
            self._send(prev.identity, [wire.REFUSED,
                                       wire.refused(f"superseded by lease token {w.lease}", fatal=False)])
            self._worker_dead(prev, f"worker for shard {prev.shard} (pid {prev.pid}) was superseded "
                                    f"by pid {w.pid} holding lease token {w.lease}")
        if old is None:
            log.info("worker pid %d registered for shard %d/%d", w.pid, w.shard, w.shards)
            if self.supervisor is not None:
                self.supervisor.worker_registered(w.pid)
        if w.bus:
            assert self.link is not None
            self.link.follow(w.bus, bus_key)
        self._send(identity, [wire.HEARTBEAT])

    def _bus_key(self, info: dict[str, Any]) -> bytes | None:
        """The CurveZMQ public key of a worker's tcp:// bus (READY ``curve_key``), when the
        cluster links are encrypted; it must be one of the key set's authorized keys."""
        bus = info.get("bus")
        if self.curve is None or not isinstance(bus, str) or not is_tcp(bus):
            return None
        key = info.get("curve_key")
        if not isinstance(key, str) or key.encode() not in self.curve.keys.authorized:
            raise Refusal(f"worker bus {bus} must be encrypted with an authorized CurveZMQ key: "
                          "start the worker with --cluster-keys", fatal=True)
        return key.encode()

    def _replaced(self, identity: bytes, info: dict[str, Any]) -> None:
        """The worker process serving this shard reconnected over a fresh link (new identity):
        the old link's sessions are gone on its side, so end their streams here too."""
        shard = info.get("shard")
        current = self.registry.by_shard.get(shard) if isinstance(shard, int) else None
        if (current is not None and current.identity != identity and current.pid == info.get("pid")
                and current.bus == info.get("bus") and info.get("shards") == self.shards):
            self.registry.remove(current.identity)
            self._worker_dead(current, f"worker for shard {current.shard} reconnected (it heard no "
                                       "heartbeat in time and dropped this broker's sessions)", died=False)

    def _internal(self, identity: bytes) -> EdgeSession:
        s = self.internal.get(identity)
        if s is None or s.closed:
            cid = self.next_cid()
            s = EdgeSession(self, cid, lambda data: self._send(identity, [wire.CLIENT, data]),
                            lambda: None, peer="worker", internal_worker=identity)
            self.internal[identity] = s
            self.sessions[cid] = s
        return s

    def _on_event(self, topic: str, seq: int, payload: bytes) -> None:
        self.metrics.bus_events += 1
        self.fanout.publish(topic, seq, payload)

    def subscribe(self, topic: str) -> None:
        assert self.link is not None
        self.link.subscribe(topic)

    def unsubscribe(self, topic: str) -> None:
        if self.link is not None:
            self.link.unsubscribe(topic)

    def _gap(self, topic: str, after: int, upto: int | None) -> None:
        w = self.registry.for_shard(shard_for(topic, self.shards))
        if w is None:
            self.fanout.repair(topic, None)
            return
        self._send(w.identity, [wire.GAP, msgpack.packb([topic, after, upto])])

    # ------------------------------------------------------------ liveness
    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_ms / 1000
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)  # the heartbeat period itself
            for w in self.registry.expired(loop.time()):
                self._worker_dead(w, f"worker for shard {w.shard} stopped answering heartbeats")
                if self.supervisor is not None:
                    self._tasks.append(loop.create_task(self._replace_if_hung(w)))
            for identity in list(self.registry.by_identity):
                self._send(identity, [wire.HEARTBEAT])
            self.trimmer.tick()

    async def _replace_if_hung(self, w: WorkerInfo) -> None:
        """A worker declared dead that stays silent is hung (stopped, deadlocked): replace it.

        A merely slow one (a long handler, a disk stall) registers again within the grace.
        """
        assert self.supervisor is not None
        await asyncio.sleep(max(self.registry.ttl, HUNG_GRACE_S))  # the grace period itself
        if self.stopping or any(x.pid == w.pid for x in self.registry.by_identity.values()):
            return
        await self.supervisor.kill_hung(w.pid)

    def _give_up(self, reason: str) -> None:
        """A worker cannot start and restarting will not help: the broker stops with the reason."""
        if self.fatal is None:
            self.fatal = reason
            self.failed.set()

    def _worker_exited(self, shard: int, pid: int, code: int) -> None:
        w = self.registry.remove_pid(pid)
        if w is not None:
            self._worker_dead(w, f"worker for shard {shard} exited (code {code})")

    def _worker_dead(self, w: WorkerInfo, why: str, *, died: bool = True) -> None:
        """End every stream served by ``w`` with UNAVAILABLE (the clients resume)."""
        # expected while the broker itself drains (SIGTERM): not worth a warning then
        log.log(logging.INFO if self.stopping else logging.WARNING,
                "%s; failing its streams with UNAVAILABLE", why)
        if died:
            self.metrics.worker_deaths.inc()
        for s in list(self.sessions.values()):
            # the call may have completed before the worker died: "maybe done" (docs/chat.md)
            s.worker_lost(w.identity, why + "; the call may have completed: retry it only if "
                          "it is idempotent (chat sends: with the same idempotency_key)")
        internal = self.internal.pop(w.identity, None)
        if internal is not None:
            internal.connection_lost(None)

    def session_closed(self, s: EdgeSession) -> None:
        self.sessions.pop(s.cid, None)
        self.trimmer.closed()
        if s.ip is not None:
            self.per_ip.release(s.ip)
            s.ip = None

    # ------------------------------------------------------------ shutdown
    async def shutdown(self, grace: float | None = None) -> None:
        """GOAWAY, let in-flight calls finish within ``grace``, stop workers, close."""
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        grace = self.config.server.shutdown_grace_ms / 1000 if grace is None else grace
        if self._server is not None:
            self._server.close()
        if self.quic is not None:
            self.quic.stop_accepting()
        if self.web is not None:
            self.web.close()
        clients = [s for s in self.sessions.values() if s.internal_worker is None]
        for s in clients:
            s.conn.goaway(Status.OK, "server is shutting down")
            s.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(s.relays for s in clients) and loop.time() < deadline:
            await asyncio.sleep(0.02)  # drain poll, bounded by the grace period
        for s in list(self.sessions.values()):
            for relay in list(s.relays.values()):
                relay.fail(Status.UNAVAILABLE, "server shut down")
            s.flush()
            s.conn.close(Status.UNAVAILABLE, "server shut down")
            s.terminate(Status.UNAVAILABLE, "server shut down")
        if self.supervisor is not None:
            await self.supervisor.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.link is not None:
            self.link.close()
        if self.curve is not None:
            self.curve.close()
        if self.zctx is not None:
            self.zctx.term()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        if self.web is not None:
            await self.web.wait_closed()
        if self.quic is not None:
            self.quic.close()
        if self._own_runtime is not None:
            shutil.rmtree(self._own_runtime, ignore_errors=True)
        self._stopped.set()
