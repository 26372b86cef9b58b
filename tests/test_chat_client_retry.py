"""ChatClient / ChatSession retries: keyed sends after ambiguous failures are stored once.

In process (zrpc.Server + in-memory connections + a real SQLite store). The
server's commit step is wrapped to fail *after* a message was stored, the
ambiguous case a killed worker or a dropped connection produces.
"""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import pytest
from test_chat_service import ROOM, Chat, chat_server, ids, run, subscribe

import zrpc
from zrpc import Status
from zrpc.chat import Message, ResponseType
from zrpc.chat_client import Backoff, ChatClient

FAST = Backoff(initial=0.001, maximum=0.01)


def fail_after_storing(chat: Chat, status: Status, times: int = 1, method: str = "_finish") -> list[int]:
    """Make the service fail ``times`` sends with ``status`` once they are stored."""
    real = getattr(chat.service, method)
    failed: list[int] = []

    async def wrapped(*args: Any) -> Any:
        result = await real(*args)
        if len(failed) < times:
            failed.append(1)
            raise zrpc.RpcError(status, "stored, but the answer is lost; retry")
        return result

    setattr(chat.service, method, wrapped)
    return failed


async def client_of(chat: Chat, **kw: Any) -> ChatClient:
    return ChatClient(await chat.client(), chat.client, **kw)


@pytest.mark.parametrize("status", [Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED],
                         ids=lambda s: s.name)
def test_send_retries_an_ambiguous_failure_and_stores_once(tmp_path: pathlib.Path,
                                                          status: Status) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            failed = fail_after_storing(chat, status, times=2)
            retried: list[str] = []
            c = await client_of(chat, retry=FAST,
                                on_retry=lambda n, d, e: retried.append(e.status.name))
            stored = await c.send(ROOM, "ada", "once", timeout=5)
            assert stored.id == 1 and len(stored.idempotency_key) == 22
            assert len(failed) == 2 and retried == [status.name] * 2 and c.retries == 2
            assert (await c.send(ROOM, "ada", "next")).id == 2
            assert chat.service.store.committed_rows == 2
    run(main())


def test_without_retry_or_key_the_failure_is_reported(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            fail_after_storing(chat, Status.UNAVAILABLE)
            c = await client_of(chat, retry=False)
            with pytest.raises(zrpc.RpcError) as err:
                await c.send(ROOM, "ada", "maybe")
            assert err.value.status is Status.UNAVAILABLE
            assert chat.service.store.committed_rows == 1  # it was stored: "maybe stored"
    run(main())


def test_send_gives_up_at_the_deadline_and_does_not_retry_refusals(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path, max_content_bytes=5) as chat:
            fail_after_storing(chat, Status.UNAVAILABLE, times=10**6)
            c = await client_of(chat, retry=Backoff(initial=0.02, maximum=0.02, jitter=0))
            with pytest.raises(zrpc.RpcError) as err:
                await c.send(ROOM, "ada", "x", timeout=0.3)
            # the last attempt's error, or the deadline cutting an attempt in flight
            assert err.value.status in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED)
            assert 3 <= c.retries <= 15  # bounded by the deadline
            assert chat.service.store.committed_rows == 1
            before = c.retries
            with pytest.raises(zrpc.RpcError) as err:
                await c.send(ROOM, "ada", "too long")
            assert err.value.status is Status.INVALID_ARGUMENT and c.retries == before
    run(main())


def test_batch_is_resent_with_its_keys(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            # the 3rd message's commit "fails" after storing: the whole batch fails
            real = chat.service._settle
            calls = 0

            async def settle(*args: Any) -> None:
                nonlocal calls
                await real(*args)
                calls += 1
                if calls == 3:
                    raise zrpc.RpcError(Status.UNAVAILABLE, "worker exited; retry")

            chat.service._settle = settle  # type: ignore[method-assign]
            c = await client_of(chat, retry=FAST)

            async def lines() -> Any:
                for i in range(6):
                    yield Message(user="ada", content=f"b{i}", room=ROOM)

            summary = await c.batch(lines(), timeout=5)
            assert summary.total_messages == 6 and c.retries == 1
            r = await chat.client()
            _, history = await subscribe(r, "reader", since_id=0)
            assert [(m.id, m.content) for m in history if m] == [
                (i + 1, f"b{i}") for i in range(6)]
    run(main())


def test_session_resends_an_unacked_message_once_and_resumes(tmp_path: pathlib.Path) -> None:
    """The connection drops after the server stored a message but before its ack:
    the session joins again, gets the message it missed, and its resend is deduplicated."""
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            c = await client_of(chat)
            real = chat.service._finish
            dropped: list[int] = []

            async def finish(accepted: Any) -> Any:
                stored = await real(accepted)
                if stored.content == "drop me" and not dropped:
                    dropped.append(stored.id)
                    session = c.client.session
                    assert session is not None
                    session.terminate(Status.UNAVAILABLE, "connection dropped")
                return stored

            chat.service._finish = finish  # type: ignore[method-assign]
            retries: list[str] = []
            resumed = asyncio.Event()
            session = c.join(ROOM, "ada", reconnect=FAST,
                             on_retry=lambda n, d, e: retries.append(e.status.name),
                             on_resume=lambda s: resumed.set())
            async with session:
                assert (await session.send("one")).id == 1
                other = await client_of(chat)
                stored = await asyncio.wait_for(session.send("drop me"), 5)
                assert stored.id == 2 and dropped == [2]
                await asyncio.wait_for(resumed.wait(), 5)
                assert (await other.send(ROOM, "bob", "after")).id == 3
                assert (await session.send("three")).id == 4
                seen: list[int] = []
                async for event in session:
                    if event.type is ResponseType.message and event.message:
                        seen.append(event.message.id)
                        if event.message.id == 4:
                            break
                assert seen == [1, 2, 3, 4]  # each once, in order
                assert retries and session.resumes == 1
            r = await chat.client()
            _, history = await subscribe(r, "reader", since_id=0)
            assert ids(history) == [1, 2, 3, 4]
            assert chat.service.store.committed_rows == 4
    run(main())


def test_session_refused_line_does_not_end_it(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path, max_content_bytes=10) as chat:
            c = await client_of(chat)
            async with c.join(ROOM, "ada") as session:
                with pytest.raises(zrpc.RpcError) as err:
                    await session.send("far too long")
                assert err.value.status is Status.INVALID_ARGUMENT
                assert (await session.send("fine")).id == 1
                assert not session.closed
    run(main())


def test_join_with_an_id_or_timestamp_replays_first(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with chat_server(tmp_path) as chat:
            c = await client_of(chat)
            acks = [await c.send(ROOM, "ada", f"m{i}") for i in range(1, 5)]
            client = await chat.client()
            for join, expected in [(Message(user="z", room=ROOM, id=2), [3, 4]),
                                   (Message(user="z", room=ROOM, timestamp=acks[0].timestamp - 1),
                                    [1, 2, 3, 4]),
                                   (Message(user="z", room=ROOM), [])]:
                stream = await client.bidirectional_stream("Chat/JoinChat", Message,
                                                           zrpc.chat.ChatResponse)
                await stream.send(join)
                got = []
                while True:
                    r = await asyncio.wait_for(stream.receive(), 5)
                    assert r is not None
                    if r.type is ResponseType.user_joined:
                        break
                    if r.type is ResponseType.message:
                        assert r.message is not None and r.seq == 0
                        got.append(r.message.id)
                assert got == expected
                await stream.close()
            bad = await client.bidirectional_stream("Chat/JoinChat", Message,
                                                    zrpc.chat.ChatResponse)
            await bad.send(Message(user="z", room=ROOM, id=-1))
            with pytest.raises(zrpc.RpcError) as err:
                await bad.receive()
            assert err.value.status is Status.INVALID_ARGUMENT
    run(main())
