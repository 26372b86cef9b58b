"""Idempotency keys in the chat service: a retried send is answered with the first ack.

In process (zrpc.Server + in-memory clients + a real SQLite store); the
multiprocess kill test lives in tests/test_chat_exactly_once.py.
"""

from __future__ import annotations

import asyncio
import pathlib

import pytest
from test_chat_service import ROOM, chat_server, ids, join, recv, run, subscribe

import zrpc
from zrpc.chat import BatchSummary, ChatResponse, Message, ResponseType


def keyed(content: str, key: str, user: str = "alice", room: str = ROOM) -> Message:
    return Message(user=user, content=content, room=room, idempotency_key=key)


async def send(client: zrpc.Client, message: Message) -> Message:
    ack = await client.unary("Chat/SendMessage", message, ChatResponse)
    assert ack.type is ResponseType.ack and ack.message is not None
    return ack.message


def test_a_resent_key_gets_the_first_ack_and_stores_nothing(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            watcher, _ = await subscribe(c, "watcher")
            first = await send(c, keyed("hello", "k1"))
            assert (first.id, first.idempotency_key) == (1, "k1")
            again = await send(c, keyed("hello", "k1"))
            assert again == first  # same id, same timestamp
            # the same key from another user, or in another room, is another message
            other = await send(c, keyed("hello", "k1", user="bob"))
            assert other.id == 2
            assert (await send(c, keyed("x", "k1", room="elsewhere"))).id == 1
            third = await send(c, Message(user="alice", content="no key", room=ROOM))
            assert third.id == 3
            events = [await recv(watcher) for _ in range(3)]
            assert [e.message.id for e in events if e.message] == [1, 2, 3]  # nothing twice
            _, history = await subscribe(c, "reader", since_id=0)
            assert ids(history) == [1, 2, 3]
            assert [m.idempotency_key for m in history if m] == ["k1", "k1", ""]
    run(main())


def test_concurrent_sends_of_one_key_store_it_once(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            acks = await asyncio.gather(*(send(c, keyed("same", "k")) for _ in range(20)))
            assert {(a.id, a.timestamp) for a in acks} == {(1, acks[0].timestamp)}
            assert chat.service.store.committed_rows == 1
    run(main())


def test_dedupe_survives_a_restart(tmp_path: pathlib.Path) -> None:
    first: list[Message] = []

    async def before() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            first.append(await send(c, keyed("one", "k-1")))
            first.append(await send(c, keyed("two", "k-2")))

    async def after() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            assert await send(c, keyed("two", "k-2")) == first[1]
            assert (await send(c, keyed("three", "k-3"))).id == 3
            _, history = await subscribe(c, "reader", since_id=0)
            assert ids(history) == [1, 2, 3]
    run(before())
    run(after())


def test_batch_and_join_chat_deduplicate(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            stored = await send(c, keyed("a", "ka"))
            stream = await c.client_stream("Chat/SendMessageBatch", Message, BatchSummary)
            for m in [keyed("a", "ka"), keyed("b", "kb"), keyed("b", "kb"), keyed("c", "kc")]:
                await stream.send(m)
            summary = await stream.close_and_receive()
            assert summary.total_messages == 4  # every message is answered for...
            _, history = await subscribe(c, "reader", since_id=0)
            assert [(m.id, m.content) for m in history if m] == [(1, "a"), (2, "b"), (3, "c")]
            alice = await join(c, "alice")
            await alice.send(keyed("b", "kb"))
            ack = await recv(alice)
            assert ack.type is ResponseType.ack and ack.message is not None
            assert (ack.message.id, ack.message.idempotency_key) == (2, "kb")
            await alice.send(keyed("d", "kd"))
            got = [await recv(alice), await recv(alice)]  # the broadcast and the ack
            assert {(r.type, r.message.id if r.message else 0) for r in got} == {
                (ResponseType.message, 4), (ResponseType.ack, 4)}
            assert stored.id == 1
    run(main())


def test_a_key_longer_than_64_bytes_is_invalid(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            c = await chat.client()
            assert (await send(c, keyed("ok", "é" * 32))).id == 1  # 64 bytes
            with pytest.raises(zrpc.RpcError) as err:
                await send(c, keyed("no", "k" * 65))
            assert err.value.status is zrpc.Status.INVALID_ARGUMENT
            assert "idempotency_key is 65 bytes long; the limit is 64" in err.value.message
    run(main())


def test_a_retry_is_not_rate_limited_again(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path, rate_per_s=0.001, rate_burst=1) as chat:
            c = await chat.client()
            first = await send(c, keyed("once", "k"))
            assert await send(c, keyed("once", "k")) == first
            with pytest.raises(zrpc.RpcError) as err:
                await send(c, keyed("new", "k2"))
            assert err.value.status is zrpc.Status.RESOURCE_EXHAUSTED
    run(main())
