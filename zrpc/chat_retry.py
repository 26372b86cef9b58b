"""What the chat client layers share: retry policy, idempotency keys, acks.

:class:`~zrpc.backoff.Backoff` (re-exported) spaces reconnects and retries; :data:`RETRYABLE` lists the
statuses after which a stream resumes, :data:`SEND_RETRYABLE` those after
which a keyed send is tried again (the first attempt may have been stored:
the key makes the retry safe). :func:`new_key` makes idempotency keys.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Awaitable, Callable

from zrpc.backoff import Backoff
from zrpc.chat import ChatResponse, Message, ResponseType
from zrpc.client import Client
from zrpc.status import RpcError, Status

__all__ = [
    "RETRYABLE",
    "SEND_RETRYABLE",
    "Backoff",
    "Connector",
    "RetryHook",
    "alive",
    "keyed",
    "new_key",
    "new_message",
    "stored_message",
]

#: Statuses after which a subscription reconnects and resumes.
RETRYABLE = frozenset({Status.UNAVAILABLE, Status.ABORTED, Status.RESOURCE_EXHAUSTED})

#: Statuses after which a keyed send is retried: the message may have been stored.
SEND_RETRYABLE = frozenset({Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED})

#: Makes a new connected client (used to reconnect).
Connector = Callable[[], Awaitable[Client]]
#: ``on_retry(attempt, delay_seconds, error)``: called before each reconnect wait.
RetryHook = Callable[[int, float, RpcError], None]


def alive(client: Client) -> bool:
    s = client.session
    return s is not None and not s.closed and s.goaway is None


def stored_message(resp: ChatResponse, what: str) -> Message:
    """The stored message an ack carries (errors become RpcError)."""
    if resp.type is ResponseType.error:
        raise RpcError(Status.INVALID_ARGUMENT, resp.error_message or f"{what} refused")
    if resp.type is not ResponseType.ack or resp.message is None:
        raise RpcError(Status.INTERNAL, f"{what}: expected an ack carrying the stored message, "
                                        f"got {resp.type.value}")
    return resp.message


def new_key() -> str:
    """A fresh idempotency key: 22 URL-safe characters (128 random bits)."""
    return secrets.token_urlsafe(16)


def new_message(room: str, user: str, content: str, key: str = "") -> Message:
    return Message(user=user, content=content, room=room, idempotency_key=key)


def keyed(message: Message) -> Message:
    """``message`` with an idempotency key (its own if it has one)."""
    if message.idempotency_key:
        return message
    return dataclasses.replace(message, idempotency_key=new_key())
