"""Presence caps: distinct user names per connection and per unauthenticated IP."""

from __future__ import annotations

import asyncio
import pathlib

import pytest
import uvloop

import zrpc
from workers.chat.presence import PresenceGuard, client_ip
from workers.chat.service import ChatConfig, ChatService
from zrpc.chat import (
    ChatResponse,
    ListUsersRequest,
    ListUsersResponse,
    ResponseType,
    SubscribeRequest,
)
from zrpc.status import Status
from zrpc.testing import connect_in_memory


def test_client_ip() -> None:
    assert client_ip("10.0.0.1:5000") == "10.0.0.1"
    assert client_ip("[::1]:5000") == "::1"
    assert client_ip("in-memory") is None
    assert client_ip(None) is None


def test_guard_counts_distinct_names_per_connection_and_ip() -> None:
    g = PresenceGuard(per_connection=2, per_ip=3)
    a, b = object(), object()
    assert g.admit(a, "1.2.3.4", "x") is None
    assert g.admit(a, "1.2.3.4", "x") is None  # same name: refcounted, free
    assert g.admit(a, "1.2.3.4", "y") is None
    why = g.admit(a, "1.2.3.4", "z")
    assert why is not None and "limit is 2" in why
    assert g.admit(b, "1.2.3.4", "z") is None  # another connection, same IP: third name
    why = g.admit(b, "1.2.3.4", "w")
    assert why is not None and "from 1.2.3.4" in why and "limit is 3" in why
    assert g.admit(b, None, "w") is None  # authenticated: no per-IP cap
    g.release(a, "1.2.3.4", "y")
    assert g.admit(b, "1.2.3.4", "v") is not None  # per connection b is at 2 now (z, w)
    g.release(b, None, "w")
    assert g.admit(b, "1.2.3.4", "v") is None  # y freed an IP slot, w a connection slot
    for conn, ip, user in ((a, "1.2.3.4", "x"), (a, "1.2.3.4", "x"), (b, "1.2.3.4", "z"),
                           (b, "1.2.3.4", "v")):
        g.release(conn, ip, user)
    assert g.names(a) == g.names(b) == 0 and not g._by_ip and not g._by_conn


def test_a_connection_past_its_distinct_names_is_refused(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        service = ChatService(ChatConfig(data_dir=str(tmp_path), max_presence_names_per_connection=3))
        server = zrpc.Server()
        server.add_service(service.build())
        c = await connect_in_memory(server)
        streams = []
        for user in ("a", "b", "c", "a"):  # the second "a" stream is not a new name
            s = await c.server_stream("Chat/SubscribeToRoom", SubscribeRequest(room="r", user=user),
                                      ChatResponse)
            streams.append(s)
            if len(streams) < 4:
                assert (await s.next()).user_joined == user
        refused = await c.server_stream("Chat/SubscribeToRoom", SubscribeRequest(room="r2", user="d"),
                                        ChatResponse)
        with pytest.raises(zrpc.RpcError) as err:
            await refused.next()
        assert err.value.status is Status.RESOURCE_EXHAUSTED
        assert "already keeps 3 distinct user names present (the limit is 3)" in err.value.message
        joined = await c.bidirectional_stream("Chat/JoinChat", zrpc.chat.Message, ChatResponse)
        await joined.send(zrpc.chat.Message(user="e", room="r"))
        with pytest.raises(zrpc.RpcError) as err:
            while True:  # the join's ack, then the refusal
                assert (await joined.receive()).type is ResponseType.ack
        assert err.value.status is Status.RESOURCE_EXHAUSTED
        users = await c.unary("Chat/ListUsers", ListUsersRequest(room="r"), ListUsersResponse)
        assert sorted(u.name for u in users.users) == ["a", "b", "c"]
        await streams[1].close()  # "b" leaves: a new name fits again
        await asyncio.wait_for(_until_names(service, 2), 5)
        s = await c.server_stream("Chat/SubscribeToRoom", SubscribeRequest(room="r", user="d"),
                                  ChatResponse)
        assert (await s.next()).type is ResponseType.user_joined
        # another connection has its own allowance
        c2 = await connect_in_memory(server)
        s2 = await c2.server_stream("Chat/SubscribeToRoom", SubscribeRequest(room="r", user="z"),
                                    ChatResponse)
        assert (await s2.next()).type is ResponseType.user_joined
        await c.close()
        await c2.close()
        await server.shutdown(0)
        await service.close()

    uvloop.run(asyncio.wait_for(main(), 30))


async def _until_names(service: ChatService, n: int) -> None:
    """Poll (bounded by the caller's wait_for) until the connections keep ``n`` names present."""
    while sum(len(v) for v in service.presence._by_conn.values()) != n:
        await asyncio.sleep(0.01)
