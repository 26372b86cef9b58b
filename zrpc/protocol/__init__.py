"""The zrpc wire protocol, sans-IO.

Bytes in, events out: :class:`~zrpc.protocol.connection.Connection` is driven
by the in-process server, the client, the broker edge and the worker's
virtual connections alike. Nothing here touches a socket or a clock of its
own; time is passed in. The exact wire format is specified in
``docs/protocol.md``.
"""

from zrpc.protocol.connection import Connection, Role, Settings
from zrpc.protocol.events import (
    ConnectionTerminated,
    Event,
    GoAwayReceived,
    HelloReceived,
    MessageReceived,
    PingAcked,
    StatusReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from zrpc.protocol.frames import FrameDecoder, FrameFlag, FrameType, encode_frame
from zrpc.protocol.streams import StreamEvent, StreamState

__all__ = [
    "Connection",
    "ConnectionTerminated",
    "Event",
    "FrameDecoder",
    "FrameFlag",
    "FrameType",
    "GoAwayReceived",
    "HelloReceived",
    "MessageReceived",
    "PingAcked",
    "Role",
    "Settings",
    "StatusReceived",
    "StreamEnded",
    "StreamEvent",
    "StreamOpened",
    "StreamReset",
    "StreamState",
    "WindowUpdated",
    "encode_frame",
]
