"""The chat method table: what clients call, the broker routes and workers implement.

Every method is sharded by its message's ``room`` field: a room lives on one
shard, whose worker assigns its ids and publishes its events.

==========================  =============  ====================  ==================
method                      kind           request               response
==========================  =============  ====================  ==================
``Chat/SendMessage``        unary          Message               ChatResponse (ack)
``Chat/SendMessageBatch``   client stream  Message, ...          BatchSummary
``Chat/SubscribeToRoom``    server stream  SubscribeRequest      ChatResponse, ...
``Chat/JoinChat``           bidi           Message, ...          ChatResponse, ...
``Chat/ListUsers``          unary          ListUsersRequest      ListUsersResponse
==========================  =============  ====================  ==================
"""

from __future__ import annotations

from zrpc.chat.messages import (
    BatchSummary,
    ChatResponse,
    ListUsersRequest,
    ListUsersResponse,
    Message,
    SubscribeRequest,
)
from zrpc.service import MethodSpec, ServiceSpec

__all__ = [
    "CHAT",
    "JOIN_CHAT",
    "LIST_USERS",
    "SEND_MESSAGE",
    "SEND_MESSAGE_BATCH",
    "SHARD_KEY",
    "SUBSCRIBE_TO_ROOM",
]

#: The request field every chat method is sharded by.
SHARD_KEY = "room"

CHAT = ServiceSpec("Chat")

SEND_MESSAGE: MethodSpec = CHAT.unary(
    "SendMessage", Message, ChatResponse, shard_key=SHARD_KEY)
SEND_MESSAGE_BATCH: MethodSpec = CHAT.client_stream(
    "SendMessageBatch", Message, BatchSummary, shard_key=SHARD_KEY)
SUBSCRIBE_TO_ROOM: MethodSpec = CHAT.server_stream(
    "SubscribeToRoom", SubscribeRequest, ChatResponse, shard_key=SHARD_KEY)
JOIN_CHAT: MethodSpec = CHAT.bidi(
    "JoinChat", Message, ChatResponse, shard_key=SHARD_KEY)
LIST_USERS: MethodSpec = CHAT.unary(
    "ListUsers", ListUsersRequest, ListUsersResponse, shard_key=SHARD_KEY)
