"""Events returned by :meth:`Connection.receive_data`.

Plain slotted classes: the broker creates one per received frame, so they are
kept as cheap as Python allows.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConnectionTerminated",
    "Event",
    "GoAwayReceived",
    "HelloReceived",
    "MessageReceived",
    "PingAcked",
    "StatusReceived",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "WindowUpdated",
]


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        names: tuple[str, ...] = self.__slots__
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in names)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        names: tuple[str, ...] = self.__slots__
        return type(self) is type(other) and all(getattr(self, k) == getattr(other, k) for k in names)

    __hash__ = None  # type: ignore[assignment]


class HelloReceived(Event):
    """The peer's HELLO: its settings (a dict) and, from a client, its token."""

    __slots__ = ("settings",)

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings


class StreamOpened(Event):
    __slots__ = ("metadata", "method", "stream_id", "timeout_ms")

    def __init__(self, stream_id: int, method: str, timeout_ms: int | None,
                 metadata: dict[str, str]) -> None:
        self.stream_id = stream_id
        self.method = method
        self.timeout_ms = timeout_ms
        self.metadata = metadata


class MessageReceived(Event):
    """One message. ``end_stream`` is the sender's half-close (a StreamEnded follows)."""

    __slots__ = ("compressed", "end_stream", "payload", "stream_id")

    def __init__(self, stream_id: int, payload: bytes, compressed: bool, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.payload = payload
        self.compressed = compressed
        self.end_stream = end_stream


class StreamEnded(Event):
    """The peer will send no more messages on this stream (client half-close)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StatusReceived(Event):
    """The server ended the stream with a status (the stream is closed)."""

    __slots__ = ("code", "details", "message", "stream_id")

    def __init__(self, stream_id: int, code: int, message: str, details: Any) -> None:
        self.stream_id = stream_id
        self.code = code
        self.message = message
        self.details = details


class StreamReset(Event):
    """The peer aborted the stream (the stream is closed)."""

    __slots__ = ("code", "message", "stream_id")

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        self.stream_id = stream_id
        self.code = code
        self.message = message


class WindowUpdated(Event):
    """Send credit grew; ``stream_id`` 0 is the connection window."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class PingAcked(Event):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class GoAwayReceived(Event):
    """The peer will accept no stream above ``last_stream_id``."""

    __slots__ = ("code", "last_stream_id", "message")

    def __init__(self, last_stream_id: int, code: int, message: str) -> None:
        self.last_stream_id = last_stream_id
        self.code = code
        self.message = message


class ConnectionTerminated(Event):
    """The connection is over: close the transport after flushing ``data_to_send``."""

    __slots__ = ("code", "message")

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
