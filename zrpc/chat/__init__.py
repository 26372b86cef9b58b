"""The chat contract: message types and the ``Chat`` method table.

Shared by clients, the broker and the workers, like a generated stub
package. The implementation lives in :mod:`workers.chat.service`; see
``docs/chat.md`` for the semantics::

    from zrpc.chat import ChatResponse, Message
    ack = await client.unary("Chat/SendMessage",
                             Message(user="alice", content="hi", room="general"), ChatResponse)
    ack.message.id  # 1, 2, 3, ... per room
"""

from zrpc.chat.contract import (
    CHAT,
    JOIN_CHAT,
    LIST_USERS,
    SEND_MESSAGE,
    SEND_MESSAGE_BATCH,
    SHARD_KEY,
    SUBSCRIBE_TO_ROOM,
)
from zrpc.chat.messages import (
    BatchSummary,
    ChatJoinRequest,
    ChatResponse,
    ListUsersRequest,
    ListUsersResponse,
    Message,
    MessageBatch,
    ResponseType,
    SubscribeRequest,
    User,
)

__all__ = [
    "CHAT",
    "JOIN_CHAT",
    "LIST_USERS",
    "SEND_MESSAGE",
    "SEND_MESSAGE_BATCH",
    "SHARD_KEY",
    "SUBSCRIBE_TO_ROOM",
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
