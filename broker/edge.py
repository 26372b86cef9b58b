"""The broker's per-connection relay: client streams <-> shard workers.

An :class:`EdgeSession` speaks the zrpc protocol with one client (a sans-IO
server :class:`~zrpc.protocol.Connection`) and, for every worker that serves
some of its streams, one *upstream* virtual connection (a client-role
Connection whose frames travel over ZeroMQ, tagged with this session's
connection id). Flow control is per hop and chained: the broker returns a
client's credit only once it has forwarded the bytes upstream, and returns a
worker's credit only once it has written the bytes to the client, so a slow
end slows the other end down instead of growing the broker.

A :class:`Relay` is one client stream. It routes on the method's shard key
(from the metadata header ``zrpc-shard-key`` or the first message), buffers
what the next hop cannot take yet (bounded by the windows), and is also a
fan-out sink: events of attached topics join its outbox, which is bounded by
``max_buffered_messages``; past that the stream ends with RESOURCE_EXHAUSTED.
Payloads are never decoded, except the first message of a stream whose shard
key must be read.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from cluster.sharding import shard_for
from cluster.wire import trust_principal
from zrpc.codec import decompress
from zrpc.limits import ConnectionTimers, WritePauses, admit_connection, apply_budget, peer_name
from zrpc.outbox import Final, Ledger, Outbox, buffer_full, buffer_over
from zrpc.packing import packb
from zrpc.protocol.connection import Connection, Role, Settings
from zrpc.protocol.events import (
    ConnectionTerminated,
    Event,
    GoAwayReceived,
    HelloReceived,
    MessageReceived,
    StatusReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from zrpc.session import SessionBase, trace_events
from zrpc.status import RpcError, Status
from zrpc.tls import peer_identity

if TYPE_CHECKING:
    from broker.metrics import BrokerMetrics
    from broker.registry import WorkerInfo, WorkerRegistry
    from zrpc.config import ServerConfig
    from zrpc.dispatch import Authenticator
    from zrpc.fanout import FanOut
    from zrpc.limits import IpCounter

__all__ = ["SHARD_KEY_HEADER", "EdgeHost", "EdgeProtocol", "EdgeSession", "Relay", "Upstream"]

log = logging.getLogger("zrpc.broker.edge")
SHARD_KEY_HEADER = "zrpc-shard-key"


#: Events of one read handled per loop iteration (per-connection fairness, EdgeSession._handle).
SLICE = 128


class _NoReading:
    """Stands in for a transport that cannot pause reading (a worker's internal session)."""

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None


#: Largest request (after inflating) the broker's own methods (Health/Check...) accept.
LOCAL_REQUEST_LIMIT = 64 * 1024
#: Top-level fields of a first message scanned for the shard key (a hostile map of 300k
#: entries would otherwise hold the broker's loop for ~150 ms per message).
MAX_KEY_SCAN = 256


def shard_key(payload: bytes, field: str | None) -> Any:
    """The value of ``field`` in a MessagePack map, without decoding the other values.

    Scans at most :data:`MAX_KEY_SCAN` entries; other values are skipped in C,
    never built. Raises on input that is not a map.
    """
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(payload), 1), raw=False,
                                strict_map_key=False)
    unpacker.feed(payload)
    for _ in range(min(unpacker.read_map_header(), MAX_KEY_SCAN)):
        if unpacker.unpack() == field:
            return unpacker.unpack()
        unpacker.skip()
    return None


class EdgeHost(Protocol):
    """What edge sessions need of their broker (:class:`broker.broker.Broker`; a fake in tests)."""

    server_config: ServerConfig
    authenticator: Authenticator | None
    metrics: BrokerMetrics
    registry: WorkerRegistry
    fanout: FanOut
    local_methods: dict[str, Callable[[Any], Any]]
    sessions: dict[bytes, EdgeSession]        # every live session by connection id
    internal: dict[bytes, EdgeSession]        # the workers' own client sessions, by worker
    per_ip: IpCounter
    buffers: Ledger                           # bytes waiting for all clients (max_buffer_memory)
    stopping: bool

    def next_cid(self) -> bytes: ...

    def send_frames(self, identity: bytes, cid: bytes, data: bytes) -> None: ...

    def disconnect_upstream(self, identity: bytes, cid: bytes) -> None: ...

    def subscribe(self, topic: str) -> None: ...

    def session_closed(self, session: EdgeSession) -> None: ...


class Upstream:
    """One virtual connection from an edge session to one worker."""

    __slots__ = ("conn", "relays", "worker")

    def __init__(self, worker: WorkerInfo, settings: Settings) -> None:
        self.worker = worker
        self.conn = Connection(Role.CLIENT, settings, peer_settings=worker.settings or None)
        self.relays: dict[int, Relay] = {}


class Relay:
    """One client stream through the broker (see module docstring)."""

    __slots__ = ("client_ended", "deadline", "done", "edge", "inbound", "key_field", "local", "metadata",
                 "method", "outbox", "sid", "started", "timeout_ms", "timer", "topics", "up", "up_sid")

    def __init__(self, edge: EdgeSession, sid: int, method: str, timeout_ms: int | None,
                 metadata: dict[str, str], key_field: str | None) -> None:
        self.edge = edge
        self.sid = sid
        self.method = method
        self.timeout_ms = timeout_ms
        self.metadata = metadata
        self.key_field = key_field
        self.up: Upstream | None = None
        self.up_sid = 0
        self.inbound: Outbox | None = None  # to the worker, once the stream is open there
        self.outbox = Outbox(edge.conn, sid, on_ack=self._ack_upstream, on_final=self._status_sent,
                             on_error=self._cannot_deliver, ledger=edge.ledger)
        self.topics: list[str] = []
        self.client_ended = False
        self.done = False
        self.local: Callable[[Any], Any] | None = None
        self.started = edge.loop.time()
        # The deadline runs from the client's OPEN here, whether or not a message (which may be
        # needed to pick the shard) ever arrives; the worker gets what is left of it.
        self.deadline = None if timeout_ms is None else self.started + timeout_ms / 1000
        self.timer: asyncio.TimerHandle | None = None

    def expire(self) -> None:
        self.timer = None
        self.fail(Status.DEADLINE_EXCEEDED, "deadline exceeded")

    def remaining_ms(self) -> int | None:
        """What is left of the client's deadline, for the OPEN sent upstream."""
        if self.deadline is None:
            return None
        return max(0, math.ceil((self.deadline - self.edge.loop.time()) * 1000))

    # ---------------------------------------------------- client -> worker
    def from_client(self, payload: bytes, compressed: bool, end: bool) -> None:
        if self.up is None:
            if self.local is not None:
                self.edge.answer_local(self, payload, compressed)
                return
            self.edge.route(self, payload, compressed)
            if self.up is None:
                return
        if end:
            self.client_ended = True
        assert self.inbound is not None
        self.inbound.put(payload, compressed, end, len(payload))
        self.edge.dirty(self.up)

    def client_end(self) -> None:
        if self.client_ended:
            return
        self.client_ended = True
        if self.up is None:
            if self.local is not None:
                if not self.done:  # END before the request: a unary call without its message
                    self.fail(Status.INVALID_ARGUMENT, f"{self.method} expects one request message",
                              cancel_upstream=False)
                return
            self.edge.route(self, None, False)
            if self.up is None:
                return
        assert self.inbound is not None
        self.inbound.put_end()
        self.edge.dirty(self.up)

    def upstream_credit(self) -> None:
        if self.up is not None and self.inbound is not None:
            self.inbound.drain()
            self.edge.dirty(self.up)

    def attach_upstream(self, up: Upstream, up_sid: int) -> None:
        """The stream is open on ``up``: what the client sends now queues for its credit there."""
        self.up = up
        self.up_sid = up_sid
        up.relays[up_sid] = self
        self.inbound = Outbox(up.conn, up_sid, on_ack=self._ack_client, on_error=self._cannot_forward)

    def _ack_client(self, n: int) -> None:
        """Bytes forwarded to the worker: the client may send as many again."""
        self.edge.conn.acknowledge(self.sid, n)

    def _cannot_forward(self, exc: RpcError) -> None:
        self.fail(exc.status, f"{exc.message}: the worker cannot take it")

    # ---------------------------------------------------- worker -> client
    def to_client(self, payload: bytes, compressed: bool, ack: int) -> None:
        edge = self.edge
        if not self.outbox.put(payload, compressed, False, ack):
            edge.block(self)
            edge.within_budget()
        edge.schedule_flush()

    def _ack_upstream(self, n: int) -> None:
        """Bytes written to the client: the worker may send as many again."""
        up = self.up
        if up is not None:
            up.conn.acknowledge(self.up_sid, n)
            self.edge.dirty(up)

    def _cannot_deliver(self, exc: RpcError) -> None:
        # never skip a message silently: the client would miss it
        self.fail(exc.status, f"{exc.message}; raise the client's max_message_size")

    def credit_arrived(self) -> None:
        """The client granted credit: drain the outbox (called by SessionBase)."""
        edge = self.edge
        if self.outbox.drain():
            edge.unblock(self)
        edge.schedule_flush()

    def status_to_client(self, code: int, message: str, details: Any) -> None:
        self.outbox.put_status(code, message, details)
        self.edge.schedule_flush()

    def _status_sent(self, final: Final) -> None:
        self.finish(cancel_upstream=False, code=final.code, message=final.message)

    def fail(self, code: Status, message: str, *, cancel_upstream: bool = True) -> None:
        """End the stream now (outbox dropped) with a status to the client."""
        self.outbox.clear()
        conn = self.edge.conn
        if self.sid in conn.streams:
            conn.send_status(self.sid, code, message)
            self.edge.schedule_flush()
        self.finish(cancel_upstream=cancel_upstream, code=code, message=message)

    def finish(self, *, cancel_upstream: bool, code: int = Status.CANCELLED, message: str = "") -> None:
        if self.done:
            return
        self.done = True
        edge = self.edge
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        metrics = edge.broker.metrics
        metrics.call_latency(self.method, edge.loop.time() - self.started)
        metrics.call_done(self.method, code, message)  # every relayed or local call, cancelled too
        edge.relays.pop(self.sid, None)
        edge.unblock(self)
        up = self.up
        if up is not None:
            up.relays.pop(self.up_sid, None)
            if cancel_upstream and self.up_sid in up.conn.streams:
                up.conn.reset_stream(self.up_sid, code, message)
                edge.dirty(up)
        for topic in self.topics:
            edge.broker.fanout.detach(topic, self)
        self.topics.clear()

    # ------------------------------------------------------ fan-out sink
    def deliver(self, payload: bytes) -> bool:
        if self.done:
            return False
        edge = self.edge
        if len(self.outbox) >= edge.max_outbox:
            self.fail(Status.RESOURCE_EXHAUSTED, buffer_full(edge.max_outbox))
            return False
        if self.outbox.bytes + len(payload) > edge.max_outbox_bytes:
            self.fail(Status.RESOURCE_EXHAUSTED, buffer_over(edge.max_outbox_bytes))
            return False
        self.to_client(payload, False, 0)
        return not self.done

    def abort(self, code: Status, message: str) -> None:
        self.fail(code, message)


class EdgeSession(SessionBase):
    """One client connection at the broker (see module docstring)."""

    def __init__(self, broker: EdgeHost, cid: bytes, write: Callable[[bytes], Any],
                 close_transport: Callable[[], Any], *, peer: str | None,
                 internal_worker: bytes | None = None) -> None:
        cfg = broker.server_config
        metrics = broker.metrics

        def write_counted(data: bytes) -> None:
            metrics.bytes_out += len(data)
            write(data)

        super().__init__(Connection(Role.SERVER, cfg.settings()), write_counted, close_transport,
                         debug=cfg.enable_debug_logging)
        self.broker = broker
        self.cid = cid
        self.peer = peer
        self.internal_worker = internal_worker
        self.relays: dict[int, Relay] = {}
        self.upstreams: dict[bytes, Upstream] = {}
        self._dirty: set[Upstream] = set()
        self.max_outbox = cfg.stream_config.max_buffered_messages
        self.max_outbox_bytes = cfg.stream_config.max_buffered_bytes
        self._backlog: collections.deque[Event] | None = None  # events of a read not handled yet
        self.reading: Any = _NoReading()  # the transport (pause_reading/resume_reading)
        self.hello_received = False
        self.ip: str | None = None  # counted in the broker's per-IP limit while set
        self.up_settings = Settings(max_message_size=cfg.max_message_size,
                                    initial_stream_window=cfg.stream_config.buffer_size,
                                    initial_connection_window=2**31 - 1)

    # ------------------------------------------------------------- client
    def data_received(self, data: bytes) -> None:
        self.broker.metrics.bytes_in += len(data)
        events = self.conn.receive_data(data, self.loop.time())
        if self.debug:
            trace_events(events)
        if self._backlog is not None:  # still working through an earlier read (reading is paused)
            self._backlog.extend(events)
            return
        self._handle(events)

    def _handle(self, events: list[Event]) -> None:
        """Act on a read's events, at most :data:`SLICE` per loop iteration.

        A read can carry thousands of frames (one client opening 1,000 streams
        at once); the rest waits for the next iteration, with the socket's
        reading paused, so that the other connections' work runs in between.
        """
        if len(events) > SLICE:
            self._backlog = collections.deque(events[SLICE:])
            events = events[:SLICE]
            self.reading.pause_reading()
            self.loop.call_soon(self._next_slice)
        relays = self.relays
        for ev in events:
            match ev:
                case MessageReceived():
                    relay = relays.get(ev.stream_id)
                    if relay is not None:
                        relay.from_client(ev.payload, ev.compressed, ev.end_stream)
                case WindowUpdated():
                    self.window_updated(ev.stream_id)
                case StreamOpened():
                    self._open(ev)
                case StreamEnded():
                    relay = relays.get(ev.stream_id)
                    if relay is not None:
                        relay.client_end()
                case StreamReset():
                    relay = relays.get(ev.stream_id)
                    if relay is not None:
                        relay.finish(cancel_upstream=True, code=ev.code, message=ev.message)
                case HelloReceived():
                    if not self._hello(ev.settings):
                        return
                case ConnectionTerminated():
                    self.terminate(ev.code, ev.message)
                    return
        self.flush()

    def _next_slice(self) -> None:
        backlog, self._backlog = self._backlog, None
        if backlog and not self.closed:
            self._handle(list(backlog))
        if self._backlog is None and not self.closed:
            self.reading.resume_reading()

    def _hello(self, settings: dict[str, Any]) -> bool:
        auth = trust_principal if self.internal_worker is not None else self.broker.authenticator
        if not self.accept_hello(settings, auth):
            return False
        self.hello_received = True
        return True

    def end_streams(self, code: Status, message: str) -> None:
        for relay in list(self.relays.values()):
            relay.fail(code, message)

    def _open(self, ev: StreamOpened) -> None:
        sid = ev.stream_id
        broker = self.broker
        local = broker.local_methods.get(ev.method)
        route = broker.registry.methods.get(ev.method)
        if local is None and route is None:
            if broker.registry.all_shards_owned():
                code, why = Status.UNIMPLEMENTED, f"unknown method {ev.method!r}"
            else:  # starting up: not every worker has announced its methods yet
                code, why = Status.UNAVAILABLE, f"{ev.method!r} is not available yet: workers are starting"
            if sid in self.conn.streams:  # a RESET in the same read may have ended it already
                self.conn.send_status(sid, code, why)
            # one label for every unknown name: clients must not grow the metrics without bound
            broker.metrics.call_done("(unknown)", code)
            return
        if (self.identity is None and broker.authenticator is not None
                and self.internal_worker is None and not ev.method.startswith("Health/")):
            if sid in self.conn.streams:
                self.conn.send_status(sid, Status.UNAUTHENTICATED,
                                      f"{ev.method} requires authentication: connect with a token "
                                      "(zrpc --token / ZRPC_TOKEN) or a client certificate")
            broker.metrics.call_done(ev.method, Status.UNAUTHENTICATED)
            return
        if ev.timeout_ms == 0:  # already expired (docs/protocol.md section 10)
            if sid in self.conn.streams:
                self.conn.send_status(sid, Status.DEADLINE_EXCEEDED, "deadline exceeded (timeout_ms = 0)")
            broker.metrics.call_done(ev.method, Status.DEADLINE_EXCEEDED)
            return
        relay = Relay(self, sid, ev.method, ev.timeout_ms, ev.metadata,
                      route.shard_key if route is not None else None)
        relay.local = local
        self.relays[sid] = relay
        if relay.deadline is not None:
            relay.timer = self.loop.call_at(relay.deadline, relay.expire)
        if local is None and (route is None or route.shard_key is None
                              or SHARD_KEY_HEADER in ev.metadata):
            self.route(relay, None, False)

    def answer_local(self, relay: Relay, payload: bytes, compressed: bool) -> None:
        try:
            if len(payload) > LOCAL_REQUEST_LIMIT:  # the builtins take {}: never decode megabytes
                raise ValueError(f"requests to {relay.method} are limited to {LOCAL_REQUEST_LIMIT} bytes")
            request = msgpack.unpackb(decompress(payload, LOCAL_REQUEST_LIMIT)
                                      if compressed else payload)
            assert relay.local is not None
            reply = packb(relay.local(request))
        except Exception as exc:
            relay.fail(Status.INVALID_ARGUMENT, f"bad request: {exc}", cancel_upstream=False)
            return
        relay.to_client(reply, False, 0)
        relay.status_to_client(Status.OK, "", None)

    def route(self, relay: Relay, payload: bytes | None, compressed: bool) -> None:
        """Pick the worker for a stream and open it upstream."""
        broker = self.broker
        registry = broker.registry
        key = relay.metadata.get(SHARD_KEY_HEADER)
        worker: WorkerInfo | None
        if relay.key_field is None and key is None:
            worker = registry.any_worker()
            where = "any shard"
        else:
            if key is None:
                if payload is None:
                    relay.fail(Status.INVALID_ARGUMENT, f"{relay.method} needs a request message "
                               f"(its {relay.key_field!r} field picks the shard)", cancel_upstream=False)
                    return
                try:
                    key = shard_key(decompress(payload, self.conn.local.max_message_size)
                                    if compressed else payload, relay.key_field)
                except Exception:
                    key = None
                if not isinstance(key, str):
                    relay.fail(Status.INVALID_ARGUMENT, f"{relay.method}: the request must carry a string "
                               f"{relay.key_field!r} field (it picks the shard)", cancel_upstream=False)
                    return
            shard = shard_for(key, registry.shards)
            worker = registry.for_shard(shard)
            where = f"shard {shard}"
        if worker is None:
            relay.fail(Status.UNAVAILABLE, f"no live worker for {where}; retry shortly",
                       cancel_upstream=False)
            return
        up = self.upstreams.get(worker.identity)
        if up is None:
            # The worker may send this client no message larger than the client accepts: a
            # handler then gets RESOURCE_EXHAUSTED on its send instead of the broker dropping it.
            limit = min(self.up_settings.max_message_size, self.conn.peer_max_message_size)
            up = self.upstreams[worker.identity] = Upstream(
                worker, dataclasses.replace(self.up_settings, max_message_size=limit))
            up.conn.send_hello({"principal": self.identity, "claims": self.claims, "peer": self.peer})
        try:
            up_sid = up.conn.open_stream(relay.method, relay.metadata, relay.remaining_ms())
        except RpcError as exc:
            relay.fail(exc.status, exc.message, cancel_upstream=False)
            return
        relay.attach_upstream(up, up_sid)
        self.dirty(up)

    # ------------------------------------------------------------- worker
    def dirty(self, up: Upstream) -> None:
        self._dirty.add(up)
        self.schedule_flush()

    def flush(self) -> None:
        super().flush()
        if self._dirty:
            send = self.broker.send_frames
            for up in self._dirty:
                if up.conn.has_data_to_send:
                    send(up.worker.identity, self.cid, up.conn.data_to_send())
            self._dirty.clear()

    def from_worker(self, identity: bytes, frames: bytes) -> None:
        up = self.upstreams.get(identity)
        if up is None:
            return
        for ev in up.conn.receive_data(frames):
            match ev:
                case MessageReceived():
                    relay = up.relays.get(ev.stream_id)
                    if relay is not None:
                        relay.to_client(ev.payload, ev.compressed, len(ev.payload))
                    else:
                        up.conn.acknowledge(ev.stream_id, len(ev.payload))
                case StatusReceived():
                    relay = up.relays.get(ev.stream_id)
                    if relay is not None:
                        relay.status_to_client(ev.code, ev.message, ev.details)
                case WindowUpdated():
                    sid = ev.stream_id
                    targets = list(up.relays.values()) if sid == 0 else [up.relays.get(sid)]
                    for relay in targets:
                        if relay is not None:
                            relay.upstream_credit()
                case StreamReset():
                    relay = up.relays.get(ev.stream_id)
                    if relay is not None:
                        relay.fail(Status.coerce(ev.code), ev.message, cancel_upstream=False)
                case GoAwayReceived() | ConnectionTerminated():
                    self.worker_lost(identity, f"worker closed the connection: {ev.message}")
                    return
        self.dirty(up)

    def attach(self, identity: bytes, up_sid: int, topic: str, after_seq: int) -> None:
        up = self.upstreams.get(identity)
        relay = up.relays.get(up_sid) if up is not None else None
        if relay is None or relay.done:
            return
        relay.topics.append(topic)
        if self.broker.fanout.attach(topic, relay, after_seq):
            self.broker.subscribe(topic)

    def worker_lost(self, identity: bytes, why: str) -> None:
        up = self.upstreams.pop(identity, None)
        if up is None:
            return
        self._dirty.discard(up)
        for relay in list(up.relays.values()):
            relay.fail(Status.UNAVAILABLE, why, cancel_upstream=False)
        self.flush()

    # ------------------------------------------------------------ closing
    def on_closed(self, error: RpcError) -> None:
        if self.internal_worker is None:
            self.broker.metrics.activity.connection_closed(self.peer, error.status, error.message)
        self.flush()  # frames the client sent before it went away still reach the workers, before X
        for relay in list(self.relays.values()):
            relay.finish(cancel_upstream=False)
        for identity in self.upstreams:
            self.broker.disconnect_upstream(identity, self.cid)
        self.upstreams.clear()
        self.broker.session_closed(self)


class EdgeProtocol(WritePauses, asyncio.Protocol):
    """asyncio glue of one client connection: admission, handshake and idle timers, linger."""

    def __init__(self, broker: EdgeHost, *, websocket: bool = False) -> None:
        self.broker = broker
        self.websocket = websocket  # carried in WebSocket messages: the TLS ALPN is http/1.1
        self.session: EdgeSession | None = None
        self.transport: Any = None
        self._timers: ConnectionTimers | None = None

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport
        broker = self.broker
        cfg = broker.server_config
        ip = admit_connection(transport, serving=not broker.stopping,
                              open_connections=len(broker.sessions) - len(broker.internal),  # clients only
                              max_connections=cfg.max_connections, per_ip=broker.per_ip,
                              check_alpn=not self.websocket)
        if ip is None:
            return
        self.transport = transport
        peer = peer_name(transport)
        s = EdgeSession(broker, broker.next_cid(), transport.write, self._close_transport, peer=peer)
        s.ip = ip  # released by Broker.session_closed
        apply_budget(s, transport, cfg.max_connection_buffer, broker.buffers,
                     lambda: broker.sessions.values())
        if hasattr(transport, "pause_reading"):
            s.reading = transport
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is not None:
            s.identity = peer_identity(ssl_obj)
        self.session = s
        broker.sessions[s.cid] = s
        broker.metrics.activity.connection_opened(peer)
        self._timers = ConnectionTimers(s, cfg, lambda: s.hello_received)

    def _close_transport(self) -> None:
        """Close the socket; abort it if the peer does not finish the TLS close promptly."""
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
        if self.session is not None:
            self.session.connection_lost(exc)
