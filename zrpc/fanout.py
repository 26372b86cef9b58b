"""Topic fan-out with per-topic sequence numbers: exactly once, in order.

A publisher gives every event of a topic (a room) the next sequence number.
A stream *attaches* to a topic with the last sequence number it has already
been given; :class:`FanOut` then delivers exactly the events after it. The
same class serves the in-process server (where delivery is lossless) and the
broker (where the ZeroMQ bus may drop): a jump in sequence numbers is a gap;
events after it wait in a bounded buffer while ``on_gap`` asks the owning
shard for the missing ones, and :meth:`FanOut.repair` fills them in. A gap
that cannot be repaired ends the topic's streams with a status that tells
the client to resume from its last id.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Protocol

from zrpc.status import Status

__all__ = ["Bus", "FanOut", "Sink", "Topic"]


class Bus(Protocol):
    """Where a service publishes events (in-process fan-out or the ZeroMQ bus)."""

    def publish(self, topic: str, seq: int, payload: bytes) -> None: ...


class Sink(Protocol):
    """An attached stream."""

    def deliver(self, payload: bytes) -> bool:
        """Queue one event; False when the stream is gone (it is then detached)."""
        ...

    def abort(self, code: Status, message: str) -> None:
        """End the stream with a status (unrepairable gap)."""
        ...


class Topic:
    __slots__ = ("last_seq", "name", "pending", "repairing", "ring", "sinks")

    def __init__(self, name: str, last_seq: int, ring: int) -> None:
        self.name = name
        self.last_seq = last_seq
        self.sinks: dict[Sink, int] = {}
        self.ring: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=ring)
        self.pending: dict[int, bytes] = {}
        self.repairing = False


class FanOut:
    """topic -> attached sinks (see module docstring)."""

    def __init__(self, *, ring: int = 1024, max_pending: int = 8192,
                 on_gap: Callable[[str, int, int], None] | None = None,
                 on_empty: Callable[[str], None] | None = None) -> None:
        self.topics: dict[str, Topic] = {}
        self._ring = ring
        self._max_pending = max_pending
        self.on_gap = on_gap
        self.on_empty = on_empty
        self.deliveries = 0
        self.gaps = 0
        self.repairs = 0

    def attach(self, topic: str, sink: Sink, after_seq: int) -> bool:
        """Attach ``sink``; returns True when this created the topic (subscribe to it)."""
        t = self.topics.get(topic)
        created = t is None
        if t is None:
            t = self.topics[topic] = Topic(topic, after_seq, self._ring)
        if after_seq < t.last_seq and not t.ring and not t.pending:
            # Nothing was delivered here yet: the topic only started at a later attacher's
            # snapshot (its ATTACH overtook this one). Start lower and fetch the events between
            # from the shard; sinks attached above them skip them (delivery is per sink start).
            gap_upto = t.last_seq
            t.last_seq = after_seq
            t.sinks[sink] = after_seq
            if self.on_gap is not None and not t.repairing:
                self.gaps += 1
                t.repairing = True
                self.on_gap(topic, after_seq, gap_upto)
            return created
        if after_seq < t.last_seq:
            # The sink's snapshot is older than what was already delivered: catch up from the ring.
            missed = [(s, p) for s, p in t.ring if s > after_seq]
            if not missed or missed[0][0] != after_seq + 1:
                sink.abort(Status.ABORTED, f"events after {after_seq} are no longer buffered; "
                                           "resume from your last id")
                return created
            for _, payload in missed:
                if not sink.deliver(payload):
                    return created
        t.sinks[sink] = after_seq
        if t.last_seq < after_seq and self.on_gap is not None and not t.repairing:
            # We are behind the shard: make sure the events up to after_seq arrive.
            t.repairing = True
            self.on_gap(topic, t.last_seq, after_seq)
        return created

    def detach(self, topic: str, sink: Sink) -> None:
        t = self.topics.get(topic)
        if t is None:
            return
        t.sinks.pop(sink, None)
        if not t.sinks:
            del self.topics[topic]
            if self.on_empty is not None:
                self.on_empty(topic)

    def publish(self, topic: str, seq: int, payload: bytes) -> None:
        """Deliver one event of ``topic`` (dropped when nobody is attached)."""
        t = self.topics.get(topic)
        if t is None or seq <= t.last_seq:
            return
        if seq != t.last_seq + 1 or t.repairing:
            self._hold(t, seq, payload)
            return
        self._deliver(t, seq, payload)

    def observe(self, topic: str, seq: int) -> None:
        """The shard says its last event of ``topic`` is ``seq`` (heartbeat): repair a tail gap."""
        t = self.topics.get(topic)
        if t is not None and seq > t.last_seq and not t.repairing and self.on_gap is not None:
            self.gaps += 1
            t.repairing = True
            self.on_gap(topic, t.last_seq, seq)

    def _deliver(self, t: Topic, seq: int, payload: bytes) -> None:
        t.last_seq = seq
        t.ring.append((seq, payload))
        dead = None
        n = 0
        for sink, start in list(t.sinks.items()):  # a sink may detach itself while we deliver
            if seq > start:
                n += 1
                if not sink.deliver(payload):
                    dead = [sink] if dead is None else [*dead, sink]
        self.deliveries += n
        if dead:
            for sink in dead:
                self.detach(t.name, sink)

    def _hold(self, t: Topic, seq: int, payload: bytes) -> None:
        if len(t.pending) >= self._max_pending:
            self._abort_topic(t, "fan-out fell too far behind")
            return
        t.pending[seq] = payload
        if not t.repairing:
            self.gaps += 1
            t.repairing = True
            if self.on_gap is not None:
                self.on_gap(t.name, t.last_seq, seq - 1)

    def repair(self, topic: str, events: list[tuple[int, bytes]] | None) -> None:
        """The shard's answer to ``on_gap``: the missing events, or None if it no longer has them."""
        t = self.topics.get(topic)
        if t is None:
            return
        t.repairing = False
        if events is None:
            self._abort_topic(t, "events were lost and are no longer buffered")
            return
        self.repairs += 1
        for seq, payload in events:
            if seq > t.last_seq:
                t.pending.setdefault(seq, payload)
        while t.last_seq + 1 in t.pending and t.name in self.topics:
            seq = t.last_seq + 1
            self._deliver(t, seq, t.pending.pop(seq))
        if t.pending and t.name in self.topics:
            # Still a hole below the buffered events: ask again for what is missing.
            t.repairing = True
            if self.on_gap is not None:
                self.on_gap(t.name, t.last_seq, min(t.pending) - 1)

    def _abort_topic(self, t: Topic, why: str) -> None:
        sinks = list(t.sinks)
        t.sinks.clear()
        self.topics.pop(t.name, None)
        for sink in sinks:
            sink.abort(Status.ABORTED, f"{why}; resume from your last id")
        if self.on_empty is not None:
            self.on_empty(t.name)
