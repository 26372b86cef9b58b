"""The broker <-> worker link over ZeroMQ (:mod:`cluster.link`'s interfaces).

The broker binds a ROUTER that every worker's DEALER connects to (one
DEALER per broker; the ROUTER tags messages with the worker's identity), and
a SUB socket that connects to each worker's PUB bus. Sockets never block the
loop: high-water marks are off on the ROUTER/DEALER pair (flow control is the
zrpc windows carried inside), sends are non-blocking, and sockets are drained
by :class:`~cluster.zmqio.SocketReader`. A worker's :meth:`ZmqWorkerEnd.open`
after a silent broker closes the DEALER and opens a new one (the zguide's
Paranoid Pirate), so nothing queued for the old connection is delivered.
With a cluster key set (:mod:`cluster.curve`) every ``tcp://`` socket is
CurveZMQ: the ROUTER and each PUB bus are servers, DEALERs and the SUB clients;
the ROUTER's socket monitor reports peers that fail the handshake
(:meth:`~cluster.curve.CurveGuard.on_monitor_event` logs them).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import zmq

from cluster import wire
from cluster.curve import CurveGuard, is_tcp
from cluster.link import OnEvent, OnMessage, OnWorkerMessage
from cluster.zmqio import SocketReader

__all__ = ["ZmqBrokerEnd", "ZmqPublisher", "ZmqWorkerEnd"]

log = logging.getLogger("zrpc.zmq")


class ZmqBrokerEnd:
    """ROUTER for the workers' messages + SUB for their buses."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, curve: CurveGuard | None = None) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.curve = curve            # tcp:// links are CurveZMQ with a key set
        self._followed: set[str] = set()
        self._monitor: zmq.Socket[Any] | None = None  # failed CurveZMQ handshakes
        self._router: zmq.Socket[Any] | None = None
        self._sub: zmq.Socket[Any] | None = None
        self._readers: list[SocketReader] = []

    def start(self, on_message: OnWorkerMessage, on_event: OnEvent) -> None:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.LINGER, 0)
        try:
            if self.curve is not None and is_tcp(self.endpoint):
                self.curve.serve(router)
            router.bind(self.endpoint)
        except zmq.ZMQError:
            router.close(0)
            raise
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.LINGER, 0)
        self._router, self._sub = router, sub

        def message(msg: list[bytes]) -> None:
            if len(msg) >= 2:
                on_message(msg[0], msg[1:])

        def event(msg: list[bytes]) -> None:
            if len(msg) == 3 and msg[0][-1:] == b"\0" and len(msg[1]) == wire.SEQ.size:
                on_event(msg[0][:-1].decode("utf-8", "surrogatepass"), wire.SEQ.unpack(msg[1])[0], msg[2])

        self._router_reader = SocketReader(router, message)
        self._readers = [self._router_reader, SocketReader(sub, event)]
        if self.curve is not None and is_tcp(self.endpoint):
            self._monitor = router.get_monitor_socket(self.curve.HANDSHAKE_FAILED)
            self._readers.append(SocketReader(self._monitor, self.curve.on_monitor_event))

    def send(self, worker: bytes, frames: list[bytes]) -> None:
        assert self._router is not None
        try:
            self._router.send_multipart([worker, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the worker is gone; heartbeats notice
            log.debug("send to worker failed: %s", exc)
        self._router_reader.kick()

    def follow(self, bus: str, key: bytes | None = None) -> None:
        if bus not in self._followed and self._sub is not None:
            if key is not None and self.curve is not None:
                self.curve.client(self._sub, key)
            self._sub.connect(bus)
            self._followed.add(bus)

    def subscribe(self, topic: str) -> None:
        if self._sub is not None:
            self._sub.setsockopt(zmq.SUBSCRIBE, wire.topic_frame(topic))

    def unsubscribe(self, topic: str) -> None:
        if self._sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.setsockopt(zmq.UNSUBSCRIBE, wire.topic_frame(topic))

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        if self._monitor is not None and self._router is not None:
            self._router.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
        for sock in (self._router, self._sub):
            if sock is not None:
                sock.close(0)
        self._router = self._sub = None


class ZmqWorkerEnd:
    """One DEALER connected to one broker's ROUTER."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, curve: CurveGuard | None = None) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.curve = curve
        self._sock: zmq.Socket[Any] | None = None
        self._reader: SocketReader | None = None

    def open(self, on_message: OnMessage) -> None:
        self.close()
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self.curve is not None and is_tcp(self.endpoint):
            self.curve.client(sock, self.curve.keys.broker_public)
        sock.connect(self.endpoint)
        self._sock = sock
        self._reader = SocketReader(sock, on_message)

    def send(self, frames: list[bytes]) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            log.debug("send to broker %s failed: %s", self.endpoint, exc)
        if self._reader is not None:
            self._reader.kick()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


class ZmqPublisher:
    """A worker's PUB socket: publishes each event once for every subscribed broker."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, curve: CurveGuard | None = None) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None and is_tcp(endpoint):
            curve.serve(self.sock)
        self.endpoint = endpoint
        self._send = self.sock.send_multipart
        self.dropped = 0

    def bind(self) -> None:
        self.sock.bind(self.endpoint)

    def publish(self, topic: str, seq: int, payload: bytes) -> None:
        try:
            self._send([wire.topic_frame(topic), wire.SEQ.pack(seq), payload], zmq.NOBLOCK)
        except zmq.Again:  # a subscriber's queue is full: the broker repairs the gap from us
            self.dropped += 1

    def close(self) -> None:
        self.sock.close(0)
