"""The broker <-> worker link as two small interfaces; :mod:`cluster.zmqlink` implements them.

The broker and the worker runtime are written against these, never against
sockets, so another transport (a shared-memory or unix-socket link for a
worker on the same host, CurveZMQ for remote workers) is one new pair of
classes. What travels is defined in :mod:`cluster.wire`:

* **messages**: a list of byte frames, the first one a command
  (``READY``, ``F``, ``HB``...). Broker -> worker messages are addressed to
  one worker by its link identity; a worker's messages arrive tagged with it.
  Delivery is in order per worker, and a message to a worker that is gone is
  dropped (its loss is noticed by heartbeats, not by the send).
* **events**: each worker publishes ``(topic, seq, payload)`` on its bus; a
  broker follows every worker's bus and receives only the topics it
  subscribed to. Events may be dropped under pressure; the broker notices
  the sequence gap and asks the owning worker to repair it.

Both ends deliver what arrives through callbacks on the event loop thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["BrokerEnd", "EventPublisher", "OnEvent", "OnMessage", "OnWorkerMessage", "WorkerEnd"]

#: ``on_message(worker_identity, frames)`` at the broker.
OnWorkerMessage = Callable[[bytes, list[bytes]], None]
#: ``on_message(frames)`` at a worker.
OnMessage = Callable[[list[bytes]], None]
#: ``on_event(topic, seq, payload)`` at the broker.
OnEvent = Callable[[str, int, bytes], None]


class BrokerEnd(Protocol):
    """The broker's end of the links to all its workers."""

    #: Where workers connect (``ipc://...``, ``tcp://host:port``).
    endpoint: str

    def start(self, on_message: OnWorkerMessage, on_event: OnEvent) -> None:
        """Start listening at :attr:`endpoint`; deliver messages and events from now on."""

    def send(self, worker: bytes, frames: list[bytes]) -> None:
        """Queue a message to one worker (dropped if that worker is gone)."""

    def follow(self, bus: str, key: bytes | None = None) -> None:
        """Receive the events published on a worker's bus (idempotent); ``key``: the bus's
        public key when the link is encrypted (it came in the worker's authenticated READY)."""

    def subscribe(self, topic: str) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...

    def close(self) -> None: ...


class WorkerEnd(Protocol):
    """A worker's end of its link to one broker."""

    def open(self, on_message: OnMessage) -> None:
        """Connect (again: a fresh connection, nothing of the old one is delivered)."""

    def send(self, frames: list[bytes]) -> None:
        """Queue a message to the broker (dropped while the link is closed)."""

    def close(self) -> None: ...


class EventPublisher(Protocol):
    """A worker's bus: events go to every broker that subscribed to the topic."""

    def publish(self, topic: str, seq: int, payload: bytes) -> None: ...

    def close(self) -> None: ...
