"""The chat service end to end: zrpc.Server + in-memory client + a real SQLite store.

Every test runs its own event loop (``uvloop.run``); none sleeps: ordering is
established from events (a stream's own ``user_joined`` proves it is attached).
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
import uvloop

import zrpc
from workers.chat import service as chat_service_module
from workers.chat.service import ChatConfig, ChatService
from zrpc.chat import (
    CHAT,
    BatchSummary,
    ChatResponse,
    ListUsersRequest,
    ListUsersResponse,
    Message,
    ResponseType,
    SubscribeRequest,
)
from zrpc.codec import decode
from zrpc.testing import connect_in_memory

ROOM = "general"
T = 5.0  # per-receive safety timeout (never reached when the code is right)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return uvloop.run(coro)


class Chat:
    """A server, its chat service and helpers to open clients."""

    def __init__(self, server: zrpc.Server, service: ChatService) -> None:
        self.server = server
        self.service = service
        self.clients: list[zrpc.Client] = []

    async def client(self) -> zrpc.Client:
        c = await connect_in_memory(self.server)
        self.clients.append(c)
        return c


@contextlib.asynccontextmanager
async def chat_server(tmp_path: pathlib.Path, *, authenticator: Any = None,
                      **config: Any) -> AsyncIterator[Chat]:
    service = ChatService(ChatConfig(data_dir=str(tmp_path / "data"), **config))
    server = zrpc.Server(authenticator=authenticator)
    server.add_service(service.build())
    chat = Chat(server, service)
    try:
        yield chat
    finally:
        for c in chat.clients:
            await c.close()
        await server.shutdown(1)
        await service.close()


async def send(client: zrpc.Client, user: str, content: str, room: str = ROOM) -> ChatResponse:
    return await client.unary("Chat/SendMessage", Message(user=user, content=content, room=room),
                              ChatResponse)


async def recv(stream: Any) -> ChatResponse:
    resp = await asyncio.wait_for(stream.receive() if hasattr(stream, "receive") else stream.next(), T)
    assert resp is not None, "stream ended unexpectedly"
    assert isinstance(resp, ChatResponse)
    return resp


async def subscribe(client: zrpc.Client, user: str, room: str = ROOM, **since: Any) -> Any:
    """A SubscribeToRoom stream; returns (stream, replayed messages) once it is attached.

    Attached = its own ``user_joined`` arrived (everything before it is replay).
    """
    stream = await client.server_stream("Chat/SubscribeToRoom",
                                        SubscribeRequest(room=room, user=user, **since), ChatResponse)
    replayed: list[Message | None] = []
    while True:
        r = await recv(stream)
        if r.type is ResponseType.user_joined and r.user_joined == user:
            return stream, replayed
        assert r.type is ResponseType.message and r.seq == 0, r
        replayed.append(r.message)


async def join(client: zrpc.Client, user: str, room: str = ROOM) -> Any:
    """A JoinChat stream after its ack and its own user_joined."""
    stream = await client.bidirectional_stream("Chat/JoinChat", Message, ChatResponse)
    await stream.send(Message(user=user, room=room))
    ack = await recv(stream)
    assert ack.type is ResponseType.ack and ack.message is None
    joined = await recv(stream)
    assert joined.type is ResponseType.user_joined and joined.user_joined == user
    return stream


def ids(messages: list[Message | None]) -> list[int]:
    return [m.id for m in messages if m is not None]


# ---------------------------------------------------------------- contract

def test_contract_methods_and_shard_keys() -> None:
    assert {m.name: (m.cardinality.wire_name, m.shard_key) for m in CHAT} == {
        "Chat/SendMessage": ("unary", "room"),
        "Chat/SendMessageBatch": ("client_stream", "room"),
        "Chat/SubscribeToRoom": ("server_stream", "room"),
        "Chat/JoinChat": ("bidi", "room"),
        "Chat/ListUsers": ("unary", "room"),
    }


# ---------------------------------------------------------------- sending

def test_seed_batch_summary(tmp_path: pathlib.Path) -> None:
    batch = [
        Message.now(0, "alice", "Hello everyone!", ROOM),
        Message.now(0, "alice", "How's everyone doing?", ROOM),
        Message.now(0, "bob", "Hi Alice! Good to see you", ROOM),
        Message.now(0, "alice", "Thanks Bob! Great to be here", ROOM),
        Message.now(0, "charlie", "Room is getting lively!", ROOM),
    ]

    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            stream = await c.client_stream("Chat/SendMessageBatch", Message, BatchSummary)
            for m in batch:
                await stream.send(m)
            summary = await stream.close_and_receive()
            assert summary.total_messages == 5
            assert summary.total_characters == sum(len(m.content) for m in batch) == 112
            assert summary.users == ["alice", "bob", "charlie"]
            assert summary.timestamp > 0
            _, history = await subscribe(c, "reader", since_id=0)
            assert ids(history) == [1, 2, 3, 4, 5]
            assert [(m.user, m.content) for m in history] == [(m.user, m.content) for m in batch]
    run(main())


def test_send_message_acks_ids_per_room(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            acks = [await send(c, "alice", f"m{i}") for i in range(20)]
            assert all(a.type is ResponseType.ack for a in acks)
            assert ids([a.message for a in acks]) == list(range(1, 21))
            stamps = [a.message.timestamp for a in acks if a.message]
            assert stamps == sorted(stamps) and stamps[0] > 0
            assert all(a.message and a.message.room == ROOM and a.message.user == "alice"
                       for a in acks)
            other = await send(c, "bob", "elsewhere", room="random")
            assert other.message is not None and other.message.id == 1
    run(main())


def test_concurrent_sends_reach_subscriber_in_id_order(tmp_path: pathlib.Path) -> None:
    n = 200

    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            watcher, _ = await subscribe(await chat.client(), "watcher")
            senders = [await chat.client() for _ in range(4)]
            acks = await asyncio.gather(*(send(senders[i % 4], f"u{i % 7}", f"msg {i}")
                                          for i in range(n)))
            assert sorted(ids([a.message for a in acks])) == list(range(1, n + 1))
            events = [await recv(watcher) for _ in range(n)]
            assert [e.type for e in events] == [ResponseType.message] * n
            assert ids([e.message for e in events]) == list(range(1, n + 1))
            seqs = [e.seq for e in events]
            assert seqs == list(range(seqs[0], seqs[0] + n))
            # Each event is the stored message: the same as its ack.
            by_id = {a.message.id: a.message for a in acks if a.message}
            assert all(e.message == by_id[e.message.id] for e in events if e.message)
    run(main())


def test_subscribers_joining_during_a_burst_see_every_message_once(tmp_path: pathlib.Path) -> None:
    """History replay + live fan-out split exactly, even while messages are in flight."""
    n = 300

    async def collect(client: zrpc.Client, name: str) -> list[int]:
        stream, replayed = await subscribe(client, name, since_id=0)
        got = ids(replayed)
        while not got or got[-1] < n:
            r = await recv(stream)
            if r.type is ResponseType.message:
                got.append(r.message.id)  # type: ignore[union-attr]
        await stream.close()
        return got

    async def main() -> None:
        async with chat_server(tmp_path, recent_limit=50, history_page=16) as chat:
            senders = [await chat.client() for _ in range(5)]
            readers = [await chat.client() for _ in range(6)]
            subs: list[asyncio.Task[list[int]]] = []

            async def sender(k: int) -> None:
                for i in range(k, n, 5):
                    await send(senders[k], f"u{k}", f"m{i}")
                    if k == 0 and i % 50 == 0:  # start subscribers at several points
                        subs.append(asyncio.create_task(collect(readers[len(subs)], f"r{i}")))
            await asyncio.gather(*(sender(k) for k in range(5)))
            results = await asyncio.gather(*subs)
            assert len(results) == 6
            for got in results:
                assert got == list(range(1, n + 1))
    run(main())


# ---------------------------------------------------------------- replay rules

def test_since_id_replays_then_goes_live(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        # recent_limit=3: since_id=4 is older than the ring, replay reads the store in pages.
        for recent_limit in (1000, 3):
            async with chat_server(tmp_path / str(recent_limit), recent_limit=recent_limit,
                                   history_page=2) as chat:
                c = await chat.client()
                for i in range(10):
                    await send(c, "alice", f"m{i}")
                stream, replayed = await subscribe(c, "bob", since_id=4)
                assert ids(replayed) == [5, 6, 7, 8, 9, 10]
                assert [m.content for m in replayed] == [f"m{i}" for i in range(4, 10)]
                await send(c, "alice", "live")
                live = await recv(stream)
                assert live.type is ResponseType.message and live.seq > 0
                assert live.message is not None and live.message.id == 11
                _, everything = await subscribe(c, "carol", since_id=0)
                assert ids(everything) == list(range(1, 12))
                _, nothing = await subscribe(c, "dave", since_id=11)
                assert nothing == []
    run(main())


def test_since_timestamp(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(1_000, 10**9, 1_000))
    monkeypatch.setattr(chat_service_module, "_now_ms", lambda: next(clock))

    async def main() -> None:
        for recent_limit in (1000, 2):
            async with chat_server(tmp_path / str(recent_limit), recent_limit=recent_limit) as chat:
                c = await chat.client()
                acks = [await send(c, "alice", f"m{i}") for i in range(5)]
                stamps = [a.message.timestamp for a in acks if a.message]
                assert len(set(stamps)) == 5
                _, after_second = await subscribe(c, "bob", since_timestamp=stamps[1])
                assert ids(after_second) == [3, 4, 5]
                _, all_ = await subscribe(c, "carol", since_timestamp=0)
                assert ids(all_) == [1, 2, 3, 4, 5]
                _, none = await subscribe(c, "dave", since_timestamp=stamps[-1])
                assert none == []
                _, both = await subscribe(c, "erin", since_timestamp=stamps[0], since_id=3)
                assert ids(both) == [4, 5]
    run(main())


def test_no_replay_by_default(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            for i in range(3):
                await send(c, "alice", f"old {i}")
            stream, replayed = await subscribe(c, "bob")
            assert replayed == []
            await send(c, "alice", "new")
            r = await recv(stream)
            assert r.message is not None and (r.message.id, r.message.content) == (4, "new")
    run(main())


# ---------------------------------------------------------------- presence

def test_two_users_chatting_join_and_leave_in_order(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            watcher, _ = await subscribe(await chat.client(), "watcher")
            alice = await join(await chat.client(), "alice")
            bob = await join(await chat.client(), "bob")
            assert (await recv(alice)).user_joined == "bob"
            await alice.send(Message(user="alice", content="hi bob", room=ROOM))
            # alice: her own message once via the fan-out, and the ack with the stored message.
            got = [await recv(alice), await recv(alice)]
            assert sorted(r.type for r in got) == [ResponseType.ack, ResponseType.message]
            assert all(r.message is not None and r.message.id == 1 for r in got)
            assert (await recv(bob)).message == got[0].message  # alice's, via the fan-out
            await bob.send(Message(user="bob", content="hi alice", room=ROOM))
            got = [await recv(bob), await recv(bob)]
            assert all(r.message is not None and r.message.id == 2 for r in got)
            await alice.close_send()
            while await asyncio.wait_for(alice.receive(), T) is not None:
                pass
            await bob.close()  # cancel instead of a graceful end
            events = [await recv(watcher) for _ in range(6)]
            assert [(e.type, e.user_joined or e.user_left or (e.message and e.message.content))
                    for e in events] == [
                (ResponseType.user_joined, "alice"),
                (ResponseType.user_joined, "bob"),
                (ResponseType.message, "hi bob"),
                (ResponseType.message, "hi alice"),
                (ResponseType.user_left, "alice"),
                (ResponseType.user_left, "bob"),
            ]
            seqs = [e.seq for e in events]
            assert seqs == list(range(seqs[0], seqs[0] + 6))
            # Nothing else is pending for the watcher: the next event is a new message.
            await send(await chat.client(), "carol", "after")
            r = await recv(watcher)
            assert r.message is not None and r.message.content == "after"
    run(main())


def test_same_user_in_several_streams_leaves_once(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            watcher, _ = await subscribe(await chat.client(), "watcher")
            c1, c2, c3 = [await chat.client() for _ in range(3)]
            s1 = await join(c1, "alice")
            assert (await recv(watcher)).user_joined == "alice"
            # Second and third streams of alice: no second user_joined (their own stream
            # starts after the first join, so they see no user_joined for alice either).
            s2 = await c2.bidirectional_stream("Chat/JoinChat", Message, ChatResponse)
            await s2.send(Message(user="alice", room=ROOM))
            assert (await recv(s2)).type is ResponseType.ack
            s3 = await c3.server_stream("Chat/SubscribeToRoom",
                                        SubscribeRequest(room=ROOM, user="alice"), ChatResponse)
            marker = await send(c1, "zed", "marker 1")
            assert (await recv(s3)).message == marker.message
            assert (await recv(s2)).message == marker.message
            assert (await recv(watcher)).message == marker.message
            users = await c1.unary("Chat/ListUsers", ListUsersRequest(ROOM), ListUsersResponse)
            assert sorted(u.name for u in users.users) == ["alice", "watcher"]

            await s1.close()  # cancel
            await c2.close()  # disconnect
            marker = await send(c1, "zed", "marker 2")
            assert (await recv(watcher)).message == marker.message  # no user_left yet
            users = await c1.unary("Chat/ListUsers", ListUsersRequest(ROOM), ListUsersResponse)
            assert sorted(u.name for u in users.users) == ["alice", "watcher"]

            await s3.close()
            left = await recv(watcher)
            assert (left.type, left.user_left) == (ResponseType.user_left, "alice")
            marker = await send(c1, "zed", "marker 3")
            assert (await recv(watcher)).message == marker.message  # exactly once
            users = await c1.unary("Chat/ListUsers", ListUsersRequest(ROOM), ListUsersResponse)
            assert [u.name for u in users.users] == ["watcher"]
    run(main())


def test_list_users(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            empty = await c.unary("Chat/ListUsers", ListUsersRequest(ROOM), ListUsersResponse)
            assert empty == ListUsersResponse(room=ROOM, users=[])
            alice = await join(c, "alice")
            await subscribe(c, "bob")
            for i in range(2):
                await alice.send(Message(user="alice", content=f"m{i}", room=ROOM))
            await send(c, "alice", "via unary")
            got = await c.unary("Chat/ListUsers", ListUsersRequest(ROOM), ListUsersResponse)
            assert got.room == ROOM
            assert [(u.name, u.message_count) for u in got.users] == [("alice", 3), ("bob", 0)]
            assert all(u.joined_at > 0 for u in got.users)
    run(main())


# ---------------------------------------------------------------- validation

def test_validation_errors_are_invalid_argument(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path, max_content_bytes=10, max_user_name=8) as chat:
            c = await chat.client()
            bad = [
                Message(user="alice", content="x", room=""),
                Message(user="", content="x", room=ROOM),
                Message(user="alice", content="é" * 6, room=ROOM),  # 12 bytes > 10
                Message(user="a" * 9, content="x", room=ROOM),
                Message(user="alice", content="x", room="a\x00b"),
            ]
            for m in bad:
                with pytest.raises(zrpc.RpcError) as err:
                    await c.unary("Chat/SendMessage", m, ChatResponse)
                assert err.value.status is zrpc.Status.INVALID_ARGUMENT, m
            with pytest.raises(zrpc.RpcError) as err:
                await c.unary("Chat/SendMessage", {"room": ROOM, "user": "a", "content": 5},
                              ChatResponse)
            assert err.value.status is zrpc.Status.INVALID_ARGUMENT
            with pytest.raises(zrpc.RpcError) as err:
                await c.unary("Chat/ListUsers", ListUsersRequest(""), ListUsersResponse)
            assert err.value.status is zrpc.Status.INVALID_ARGUMENT
            stream = await c.server_stream("Chat/SubscribeToRoom",
                                           SubscribeRequest(room=ROOM, user=""), ChatResponse)
            with pytest.raises(zrpc.RpcError) as err:
                await stream.next()
            assert err.value.status is zrpc.Status.INVALID_ARGUMENT
            # No id was used up by the rejected messages.
            ok = await send(c, "alice", "fine")
            assert ok.message is not None and ok.message.id == 1
    run(main())


def test_batch_failure_names_the_index_and_keeps_earlier_messages(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path, max_content_bytes=10) as chat:
            c = await chat.client()
            stream = await c.client_stream("Chat/SendMessageBatch", Message, BatchSummary)
            for m in [Message(user="a", content="one", room=ROOM),
                      Message(user="b", content="two", room=ROOM),
                      Message(user="c", content="far too long", room=ROOM)]:
                await stream.send(m)
            with pytest.raises(zrpc.RpcError) as err:
                await stream.close_and_receive()
            assert err.value.status is zrpc.Status.INVALID_ARGUMENT
            assert "message 2" in err.value.message and err.value.details == {"index": 2}
            _, history = await subscribe(c, "reader", since_id=0)
            assert [(m.id, m.content) for m in history] == [(1, "one"), (2, "two")]
            # A message of the wrong shape fails the same way, naming its index.
            stream = await c.client_stream("Chat/SendMessageBatch", Message, BatchSummary)
            await stream.send(Message(user="a", content="three", room=ROOM))
            await stream.send({"user": "a", "content": 4, "room": ROOM})
            with pytest.raises(zrpc.RpcError) as err:
                await stream.close_and_receive()
            assert err.value.status is zrpc.Status.INVALID_ARGUMENT
            assert "message 1" in err.value.message
            ack = await send(c, "a", "four")
            assert ack.message is not None and ack.message.id == 4
    run(main())


def test_join_chat_reports_bad_messages_and_continues(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path, max_content_bytes=10) as chat:
            c = await chat.client()
            alice = await join(c, "alice")
            await alice.send(Message(user="alice", content="far too long", room=ROOM))
            r = await recv(alice)
            assert r.type is ResponseType.error and r.error_message
            await alice.send(Message(user="alice", content="x", room="other"))
            assert (await recv(alice)).type is ResponseType.error
            await alice.send(Message(user="mallory", content="ok"))  # room may be omitted
            got = [await recv(alice), await recv(alice)]
            assert {r.type for r in got} == {ResponseType.ack, ResponseType.message}
            assert all(r.message and (r.message.id, r.message.user) == (1, "alice") for r in got)
            bad_join = await c.bidirectional_stream("Chat/JoinChat", Message, ChatResponse)
            await bad_join.send(Message(user="bob", room=""))
            with pytest.raises(zrpc.RpcError) as err:
                await bad_join.receive()
            assert err.value.status is zrpc.Status.INVALID_ARGUMENT
    run(main())


# ---------------------------------------------------------------- durability, identity, hooks

def test_restart_keeps_history_and_continues_ids(tmp_path: pathlib.Path) -> None:
    async def first() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            for i in range(5):
                await send(c, "alice", f"before {i}")
            await send(c, "bob", "other room", room="random")

    async def second() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            stream, history = await subscribe(c, "bob", since_id=0)
            assert [(m.id, m.content) for m in history] == [(i + 1, f"before {i}") for i in range(5)]
            stamps = [m.timestamp for m in history]
            ack = await send(c, "alice", "after")
            assert ack.message is not None and ack.message.id == 6
            assert ack.message.timestamp >= stamps[-1]
            live = await recv(stream)
            assert live.message == ack.message
            other = await send(c, "bob", "again", room="random")
            assert other.message is not None and other.message.id == 2
    run(first())
    run(second())


def test_identity_overrides_the_claimed_user(tmp_path: pathlib.Path) -> None:
    def authenticate(hello: dict[str, Any], peer: Any) -> tuple[str | None, dict[str, Any]]:
        return "alice", {}

    async def main() -> None:
        async with chat_server(tmp_path, authenticator=authenticate) as chat:
            c = await chat.client()
            ack = await send(c, "mallory", "hi")
            assert ack.message is not None and ack.message.user == "alice"
            stream = await c.client_stream("Chat/SendMessageBatch", Message, BatchSummary)
            await stream.send(Message(user="bob", content="x", room=ROOM))
            await stream.send(Message(user="", content="y", room=ROOM))
            summary = await stream.close_and_receive()
            assert summary.users == ["alice"]
            await subscribe(c, "alice")  # the request's user is ignored: it is alice
            s2 = await c.server_stream("Chat/SubscribeToRoom",
                                       SubscribeRequest(room=ROOM, user="eve"), ChatResponse)
            ack = await send(c, "bob", "after")
            assert (await recv(s2)).message == ack.message  # no user_joined for "eve"
            users = await c.unary("Chat/ListUsers", ListUsersRequest(ROOM), ListUsersResponse)
            assert [u.name for u in users.users] == ["alice"]
    run(main())


def test_replay_and_activity_hooks(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            svc = chat.service
            c = await chat.client()
            assert svc.drain_activity() == {}
            await subscribe(c, "bob")  # seq 1: user_joined bob
            for i in range(3):
                await send(c, "alice", f"m{i}")  # seqs 2..4
            await send(c, "alice", "elsewhere", room="random")
            assert svc.drain_activity() == {ROOM: 4, "random": 1}
            assert svc.drain_activity() == {}
            events = svc.replay(ROOM, 1, None)
            assert events is not None and [s for s, _ in events] == [2, 3, 4]
            decoded = [decode(ChatResponse, p) for _, p in events]
            assert [(r.seq, r.message.id if r.message else None) for r in decoded] == [
                (2, 1), (3, 2), (4, 3)]
            assert svc.replay(ROOM, 1, 2) == events[:1] and svc.replay(ROOM, 0, 1) is not None
            assert svc.replay(ROOM, 99, None) is None
            assert len(chat.server.dispatcher.methods) >= 5
    run(main())


def test_close_commits_accepted_messages(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        svc = ChatService(ChatConfig(data_dir=str(tmp_path)))
        server = zrpc.Server()
        server.add_service(svc.build())
        c = await connect_in_memory(server)
        acks = await asyncio.gather(*(send(c, "a", str(i)) for i in range(50)))
        assert sorted(ids([a.message for a in acks])) == list(range(1, 51))
        await svc.close()
        with pytest.raises(zrpc.RpcError) as err:
            await send(c, "a", "late")
        assert err.value.status is zrpc.Status.UNAVAILABLE
        await c.close()
        await server.shutdown(1)
        again = ChatService(ChatConfig(data_dir=str(tmp_path)))
        assert [m.id for m in again.store.read(ROOM)] == list(range(1, 51))
        await again.close()
    run(main())


def test_idle_rooms_leave_memory_but_keep_their_history(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path, rooms_in_memory=2) as chat:
            c = await chat.client()
            stream, _ = await subscribe(c, "bob", room="busy")  # a member: never dropped
            for i in range(6):
                await send(c, "alice", f"m{i}", room=f"r{i}")
                await send(c, "alice", f"again {i}", room=f"r{i}")
            assert len(chat.service.rooms) <= 4 and "busy" in chat.service.rooms
            ack = await send(c, "alice", "third", room="r0")
            assert ack.message is not None and ack.message.id == 3
            _, history = await subscribe(c, "carol", room="r1", since_id=0)
            assert [m.content for m in history] == ["m1", "again 1"]
            ack = await send(c, "alice", "still live", room="busy")
            assert (await recv(stream)).message == ack.message
    run(main())


def test_batch_forwards_rooms_of_other_shards(tmp_path: pathlib.Path) -> None:
    forwarded: list[Message] = []

    async def forward(message: Message) -> ChatResponse:
        forwarded.append(message)
        return ChatResponse.ack_response(message)

    async def main() -> None:
        service = ChatService(ChatConfig(data_dir=str(tmp_path)), owns=lambda room: room != "far",
                              forward=forward)
        server = zrpc.Server()
        server.add_service(service.build())
        c = await connect_in_memory(server)
        stream = await c.client_stream("Chat/SendMessageBatch", Message, BatchSummary)
        for room in (ROOM, "far", ROOM):
            await stream.send(Message(user="ann", content=room, room=room))
        summary = await stream.close_and_receive()
        assert (summary.total_messages, summary.users) == (3, ["ann"])
        assert forwarded == [Message(user="ann", content="far", room="far")]
        assert [m.id for m in service.store.read(ROOM)] == [1, 2]
        with pytest.raises(zrpc.RpcError) as err:
            await send(c, "ann", "x", room="far")  # only the batch forwards
        assert err.value.status is zrpc.Status.FAILED_PRECONDITION
        await c.close()
        await server.shutdown(1)
        await service.close()
    run(main())


def test_message_in_flight_when_sender_drops_is_broadcast_before_their_leave(tmp_path: pathlib.Path) -> None:
    """A JoinChat stream that ends while its message is being committed: the message
    still completes, and the room sees it before the sender's user_left."""
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            watcher = await chat.client()
            watch = await watcher.server_stream("Chat/SubscribeToRoom",
                                                SubscribeRequest(room=ROOM, user="w"), ChatResponse)
            assert (await recv(watch)).user_joined == "w"
            leaver = await chat.client()
            both = await leaver.bidirectional_stream("Chat/JoinChat", Message, ChatResponse)
            await both.send(Message(user="zed", room=ROOM))
            assert (await recv(both)).type is ResponseType.ack
            assert (await recv(watch)).user_joined == "zed"
            await both.send(Message(user="zed", room=ROOM, content="last words"))
            # wait until the handler is inside the commit of "last words", then drop the connection
            state = chat.service._state(ROOM)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + T
            while state.room.last_id < 1:
                assert loop.time() < deadline, "message never accepted"
                await asyncio.sleep(0)
            await leaver.close()
            events = [await recv(watch), await recv(watch)]
            assert [(e.type, e.message.content if e.message else e.user_left) for e in events] == [
                (ResponseType.message, "last words"), (ResponseType.user_left, "zed")]
    run(main())


def test_cancelled_sender_does_not_withdraw_its_message(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        svc = ChatService(ChatConfig(data_dir=str(tmp_path)))
        try:
            sender = asyncio.create_task(svc._finish(svc._accept(ROOM, "a", "first", None)))
            await asyncio.sleep(0)  # the row is accepted; the sender awaits its waiter
            sender.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sender
            second = await svc._finish(svc._accept(ROOM, "a", "second", None))
            assert second.id == 2
            assert [(m.id, m.content) for m in svc.store.read(ROOM)] == [(1, "first"), (2, "second")]
            assert not svc._state(ROOM).lost
        finally:
            await svc.close()
    run(main())
