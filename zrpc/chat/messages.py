"""The chat message types (those of the streaming tutorial, docs/streaming-tutorial.md), as zrpc message dataclasses.

Field names and meanings follow the tutorial so clients written from the
tutorial read naturally. Everything here is plain data: encoding is
:mod:`zrpc.codec` (a MessagePack map per message; unknown keys are ignored
and missing keys take the field's default, so fields can be added later).

Times are milliseconds since the Unix epoch, assigned by the server.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

__all__ = [
    "BatchSummary",
    "ChatJoinRequest",
    "ChatResponse",
    "ListUsersRequest",
    "ListUsersResponse",
    "Message",
    "MessageBatch",
    "ResponseType",
    "SubscribeRequest",
    "User",
]


@dataclass
class Message:
    """One chat message.

    A client fills ``user``, ``content`` and ``room``; the server assigns
    ``id`` (1, 2, 3, ... per room, no gaps) and ``timestamp`` (ms, never
    decreasing within a room) and ignores what the client put there. When the
    connection is authenticated, ``user`` is replaced by the caller's identity.

    ``idempotency_key`` (optional, at most 64 UTF-8 bytes, "" for none) is
    chosen by the client and stored with the message: a send whose key the
    room already stored for the same user is answered with the first ack
    (same ``id`` and ``timestamp``) and stores and broadcasts nothing.
    """

    id: int = 0
    user: str = ""
    content: str = ""
    timestamp: int = 0
    room: str = ""
    idempotency_key: str = ""

    @classmethod
    def now(cls, id: int, user: str, content: str, room: str) -> Message:
        """The tutorial's ``Message.now``: a message stamped with the local clock."""
        return cls(id=id, user=user, content=content, timestamp=int(time.time() * 1000), room=room)


@dataclass
class MessageBatch:
    """Several messages (the tutorial's type; ``SendMessageBatch`` streams them one by one)."""

    messages: list[Message] = field(default_factory=list)


@dataclass
class BatchSummary:
    """The answer to ``Chat/SendMessageBatch``.

    ``total_characters`` counts characters (code points) of ``content``, not
    bytes; ``users`` lists the distinct senders in order of first appearance.
    """

    total_messages: int = 0
    total_characters: int = 0
    users: list[str] = field(default_factory=list)
    timestamp: int = 0


@dataclass
class SubscribeRequest:
    """``Chat/SubscribeToRoom``: which room, who is watching, what history to replay.

    With neither ``since_id`` nor ``since_timestamp`` no history is replayed
    (only live events, as the tutorial's server does). ``since_id=k`` replays the
    messages with ``id > k`` (``0``: the whole retained history);
    ``since_timestamp=t`` those with ``timestamp > t``; given both, a message
    must satisfy both.
    """

    room: str
    user: str = ""
    since_timestamp: int | None = None
    since_id: int | None = None


@dataclass
class ChatJoinRequest:
    """Who joins which room (the tutorial's type; ``JoinChat`` takes the join as a :class:`Message`)."""

    user: str
    room: str


class ResponseType(enum.StrEnum):
    """What a :class:`ChatResponse` carries."""

    message = "message"
    user_joined = "user_joined"
    user_left = "user_left"
    error = "error"
    ack = "ack"


@dataclass
class ChatResponse:
    """What the server sends on ``SendMessage``, ``SubscribeToRoom`` and ``JoinChat``.

    ``seq`` is the room's event sequence number on the fan-out bus for live
    events (``message``, ``user_joined``, ``user_left``): strictly increasing
    per room within one server (shard) lifetime, so a client can drop
    duplicates. It is ``0`` on replayed history, acks and errors; resume
    with the last message ``id`` seen, not with ``seq``.
    """

    type: ResponseType
    message: Message | None = None
    user_joined: str | None = None
    user_left: str | None = None
    error_message: str | None = None
    seq: int = 0

    @classmethod
    def message_response(cls, message: Message, seq: int = 0) -> ChatResponse:
        return cls(type=ResponseType.message, message=message, seq=seq)

    @classmethod
    def user_joined_response(cls, user: str, seq: int = 0) -> ChatResponse:
        return cls(type=ResponseType.user_joined, user_joined=user, seq=seq)

    @classmethod
    def user_left_response(cls, user: str, seq: int = 0) -> ChatResponse:
        return cls(type=ResponseType.user_left, user_left=user, seq=seq)

    @classmethod
    def ack_response(cls, message: Message | None = None) -> ChatResponse:
        """An ack; for a sent message it carries the message as stored (id, timestamp)."""
        return cls(type=ResponseType.ack, message=message)

    @classmethod
    def error_response(cls, error_message: str) -> ChatResponse:
        return cls(type=ResponseType.error, error_message=error_message)


@dataclass
class User:
    """A present member of a room; ``message_count`` counts messages sent while present."""

    name: str
    joined_at: int
    message_count: int = 0


@dataclass
class ListUsersRequest:
    room: str


@dataclass
class ListUsersResponse:
    room: str
    users: list[User] = field(default_factory=list)
