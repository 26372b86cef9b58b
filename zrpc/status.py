"""Status codes and the exception hierarchy.

The 17 canonical gRPC status codes (so users meet familiar names), the base
:class:`RpcError` that carries one, and the streaming tutorial's error names
(:class:`StreamClosed`, :class:`ConnectionReset`, :class:`Timeout`) as typed
subclasses so ``except zrpc.Timeout`` reads like the tutorial.
"""

from __future__ import annotations

import enum
from typing import Any, Final

__all__ = [
    "ConnectionReset",
    "ProtocolError",
    "RpcError",
    "Status",
    "StreamClosed",
    "Timeout",
    "call_status",
    "error_for",
]


class Status(enum.IntEnum):
    """Canonical status codes (numbering identical to gRPC)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def coerce(cls, value: int) -> Status:
        """Map any integer to a Status; unknown numbers become UNKNOWN."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class RpcError(Exception):
    """A call ended with a non-OK status.

    ``status`` is a :class:`Status`, ``message`` a human-readable text and
    ``details`` any msgpack-encodable value the server attached (for example
    ``{"retry_after_ms": 250}`` or ``{"resume_from": 41}``).
    """

    def __init__(self, status: Status, message: str = "", details: Any = None) -> None:
        self.status = Status.coerce(int(status))
        self.message = message
        self.details = details
        super().__init__(f"{self.status.name}: {message}" if message else self.status.name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (error_for, (int(self.status), self.message, self.details))


class StreamClosed(RpcError):
    """Operation on a stream that has already ended (the tutorial's ``error.StreamClosed``)."""

    def __init__(self, message: str = "stream closed", details: Any = None,
                 status: Status = Status.CANCELLED) -> None:
        super().__init__(status, message, details)


class ConnectionReset(RpcError):
    """The connection carrying the call was lost (status UNAVAILABLE)."""

    def __init__(self, message: str = "connection lost", details: Any = None) -> None:
        super().__init__(Status.UNAVAILABLE, message, details)


class Timeout(RpcError):
    """The call's deadline passed (status DEADLINE_EXCEEDED)."""

    def __init__(self, message: str = "deadline exceeded", details: Any = None) -> None:
        super().__init__(Status.DEADLINE_EXCEEDED, message, details)


class ProtocolError(Exception):
    """The peer broke the wire protocol; the connection must be closed.

    Raised only by the sans-IO layer (:mod:`zrpc.protocol`). ``code`` is the
    status sent in the GOAWAY that closes the connection.
    """

    def __init__(self, message: str, code: Status = Status.INTERNAL) -> None:
        self.code = code
        super().__init__(message)


def error_for(status: int, message: str = "", details: Any = None) -> RpcError:
    """Build the most specific exception for a status received from a peer."""
    code = Status.coerce(status)
    if code is Status.DEADLINE_EXCEEDED:
        return Timeout(message or "deadline exceeded", details)
    if code is Status.UNAVAILABLE:
        return ConnectionReset(message or "unavailable", details)
    return RpcError(code, message, details)


#: The status of a call that ended OK with no message or details: one shared object (never raised).
_OK: Final = RpcError(Status.OK)


def call_status(status: int, message: str = "", details: Any = None) -> RpcError:
    """How a call ended, as the :class:`RpcError` its stream keeps: the one shared OK object for
    a plain OK (no allocation per call), else :func:`error_for`'s exception."""
    if not status:
        return _OK if not message and details is None else RpcError(Status.OK, message, details)
    return error_for(status, message, details)
