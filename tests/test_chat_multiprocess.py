"""The chat service through `zrpc-broker start` and 2 real workers."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

import zrpc
from cluster.sharding import shard_for
from procs import BrokerProc, children, start_broker
from zrpc.chat import (
    BatchSummary,
    ChatResponse,
    ListUsersRequest,
    ListUsersResponse,
    Message,
    ResponseType,
    SubscribeRequest,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProc]:
    b = start_broker(tmp_path, app=None)
    try:
        yield b.wait_ready()
    finally:
        b.stop()


async def connect(b: BrokerProc, home: Path) -> zrpc.Client:
    os.environ["ZRPC_HOME"] = str(home)
    c = zrpc.Client()
    await c.connect(b.address)
    return c


def rooms_by_shard() -> dict[int, str]:
    found: dict[int, str] = {}
    i = 0
    while len(found) < 2:
        found.setdefault(shard_for(f"room{i}", 2), f"room{i}")
        i += 1
    return found


async def send(c: zrpc.Client, room: str, user: str, text: str) -> Message:
    ack = await c.unary("Chat/SendMessage", Message(user=user, content=text, room=room), ChatResponse)
    assert ack.type is ResponseType.ack and ack.message is not None
    return ack.message


def test_seed_batch_spanning_two_shards(broker: BrokerProc, tmp_path: Path) -> None:
    rooms = rooms_by_shard()

    async def main() -> None:
        c = await connect(broker, tmp_path)
        batch = await c.client_stream("Chat/SendMessageBatch", Message, BatchSummary)
        sent = [("alice", "Hello everyone!", rooms[0]), ("bob", "Hi Alice!", rooms[1]),
                ("charlie", "Good morning!", rooms[0]), ("alice", "How is everyone?", rooms[1]),
                ("bob", "Great, thanks!", rooms[0])]
        for user, text, room in sent:
            await batch.send(Message(user=user, content=text, room=room))
        summary = await batch.close_and_receive()
        assert summary.total_messages == 5
        assert summary.total_characters == sum(len(t) for _, t, _ in sent)
        assert summary.users == ["alice", "bob", "charlie"]
        for shard, room in rooms.items():
            s = await c.server_stream("Chat/SubscribeToRoom", SubscribeRequest(room=room, user="auditor", since_id=0),
                                      ChatResponse)
            expected = [t for _, t, r in sent if r == room]
            got = [(await s.next()).message.content for _ in expected]  # type: ignore[union-attr]
            assert got == expected, f"room on shard {shard}"
            await s.close()
        await c.close()

    uvloop.run(main())


def test_subscriber_since_id_gets_exactly_the_missing_then_live(broker: BrokerProc, tmp_path: Path) -> None:
    async def main() -> None:
        c = await connect(broker, tmp_path)
        for i in range(1, 11):
            assert (await send(c, "lobby", "alice", f"m{i}")).id == i
        s = await c.server_stream("Chat/SubscribeToRoom", SubscribeRequest(room="lobby", user="bob", since_id=6),
                                  ChatResponse)
        replay = [(await s.next()) for _ in range(4)]
        assert [r.message.id for r in replay] == [7, 8, 9, 10]  # type: ignore[union-attr]
        joined = await s.next()
        assert joined is not None and joined.type is ResponseType.user_joined and joined.user_joined == "bob"
        for i in range(11, 16):
            await send(c, "lobby", "alice", f"m{i}")
        live = [(await s.next()) for _ in range(5)]
        assert [r.message.id for r in live] == list(range(11, 16))  # type: ignore[union-attr]
        await c.close()

    uvloop.run(main())


def test_join_and_leave_events_in_order_for_two_users(broker: BrokerProc, tmp_path: Path) -> None:
    async def main() -> None:
        watcher_c = await connect(broker, tmp_path)
        watch = await watcher_c.server_stream("Chat/SubscribeToRoom", SubscribeRequest(room="duo", user="watcher"),
                                              ChatResponse)
        first = await watch.next()
        assert first is not None and first.user_joined == "watcher"
        a_c, b_c = await connect(broker, tmp_path), await connect(broker, tmp_path)
        a = await a_c.bidirectional_stream("Chat/JoinChat", Message, ChatResponse)
        await a.send(Message(user="ann", room="duo"))
        b = await b_c.bidirectional_stream("Chat/JoinChat", Message, ChatResponse)
        await b.send(Message(user="ben", room="duo"))
        await a.send(Message(user="ann", room="duo", content="hi ben"))
        await b.send(Message(user="ben", room="duo", content="hi ann"))
        await a.close_send()
        while True:  # ben waits for the ack of his message (unacked messages carry no promise)...
            r = await asyncio.wait_for(b.receive(), 10)
            assert r is not None
            if r.type is ResponseType.ack and r.message is not None:
                break
        await b_c.close()  # ...then disconnects without saying goodbye

        events: list[tuple[str, str]] = []
        while len(events) < 6:
            try:
                r = await asyncio.wait_for(watch.next(), 10)
            except TimeoutError:
                raise AssertionError(f"only got {events}") from None
            assert r is not None
            if r.type is ResponseType.message:
                events.append(("message", r.message.content))  # type: ignore[union-attr]
            elif r.type is ResponseType.user_joined:
                events.append(("joined", r.user_joined or ""))
            elif r.type is ResponseType.user_left:
                events.append(("left", r.user_left or ""))
        # per user: joined, their message, then left exactly once (the two users interleave freely)
        for user, text in (("ann", "hi ben"), ("ben", "hi ann")):
            assert events.count(("joined", user)) == 1 and events.count(("left", user)) == 1, events
            order = [events.index(("joined", user)), events.index(("message", text)), events.index(("left", user))]
            assert order == sorted(order), events
        users = await watcher_c.unary("Chat/ListUsers", ListUsersRequest(room="duo"), ListUsersResponse)
        assert [u.name for u in users.users] == ["watcher"]
        await a_c.close()
        await watcher_c.close()

    uvloop.run(main())


def test_sigkill_after_acks_loses_nothing_and_ids_continue(broker: BrokerProc, tmp_path: Path) -> None:
    room = "durable"
    shard = shard_for(room, 2)

    async def main() -> None:
        c = await connect(broker, tmp_path)
        pid = None
        acked = []

        async def sender(k: int) -> None:
            for i in range(25):
                m = await send(c, room, f"u{k}", f"{k}-{i}")
                acked.append(m.id)

        await asyncio.gather(*(sender(k) for k in range(8)))
        n = len(acked)
        assert sorted(acked) == list(range(1, n + 1))
        info = await c.unary("Reflection/List", {}, dict)
        assert info["methods"]
        pids = set(children(broker.pid))
        # find the worker that owns the room: the one whose pid answers for this shard
        for p in pids:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            if b"--shard" in cmdline and cmdline[cmdline.index(b"--shard") + 1] == str(shard).encode():
                pid = p
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            try:
                nxt = await send(c, room, "after", "restart")
                break
            except zrpc.RpcError as exc:
                assert exc.status is zrpc.Status.UNAVAILABLE
                assert loop.time() < deadline
                await asyncio.sleep(0.05)  # retry poll while the supervisor restarts the worker
        assert nxt.id == n + 1
        s = await c.server_stream("Chat/SubscribeToRoom", SubscribeRequest(room=room, user="x", since_id=0),
                                  ChatResponse)
        ids = [(await s.next()).message.id for _ in range(n + 1)]  # type: ignore[union-attr]
        assert ids == list(range(1, n + 2))
        await c.close()

    uvloop.run(main())


def test_concurrent_senders_reach_subscriber_in_id_order(broker: BrokerProc, tmp_path: Path) -> None:
    async def main() -> None:
        c = await connect(broker, tmp_path)
        s = await c.server_stream("Chat/SubscribeToRoom", SubscribeRequest(room="busy", user="reader"), ChatResponse)
        assert (await s.next()).type is ResponseType.user_joined  # type: ignore[union-attr]
        await asyncio.gather(*(send(c, "busy", f"u{k % 7}", f"msg {k}") for k in range(300)))
        got: list[Any] = []
        while len(got) < 300:
            r = await asyncio.wait_for(s.next(), 10)
            assert r is not None
            if r.type is ResponseType.message:
                got.append(r.message.id)  # type: ignore[union-attr]
        assert got == list(range(1, 301))
        await c.close()

    uvloop.run(main())
