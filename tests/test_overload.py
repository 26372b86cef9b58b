"""Overload and hostile-client scenarios against a real ``zrpc-broker start``.

Each test drives one scenario of the broker's memory and fairness model
(docs/architecture.md, "Memory and fairness") through raw TLS connections
and asserts the figures against the documented limits: calls that never
send a message still end at their deadline, oversized responses end their
call with RESOURCE_EXHAUSTED, presence storms and never-reading clients do
not grow the broker past its budgets, and closed connections give their
memory back. Every test ends with the health check of test_hostile_input
(a normal client is served, no worker died, no traceback in any log).
Loopback only; bounded in time; the broker and its workers are stopped by
the fixture whatever happens.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import test_hostile_input as hostile
import uvloop
from test_hostile_input import F, Live, call, frame, message, open_stream

from procs import wait_for
from zrpc.chat import ChatResponse, Message, ResponseType, SubscribeRequest
from zrpc.status import Status

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]

# this module's own broker (module scope) and the health check after each test
live = hostile.live
broker = hostile.broker


# ------------------------------------------------------------ 6. calls that never end


@pytest.mark.parametrize("method", ["Health/Check", "Reflection/List", "Chat/SendMessage",
                                    "Chat/JoinChat", "Chat/SubscribeToRoom"])
def test_deadline_from_open_without_a_message(broker: Live, method: str) -> None:
    with broker.raw() as r:
        r.handshake()
        r.send(open_stream(1, method, timeout_ms=200))
        assert r.outcome(1) == ("STATUS", Status.DEADLINE_EXCEEDED, "deadline exceeded")
        r.alive()


@pytest.mark.parametrize("method", ["Chat/SendMessage", "Chat/JoinChat", "Chat/ListUsers",
                                    "Health/Check"])
def test_timeout_zero_is_already_expired(broker: Live, method: str) -> None:
    with broker.raw() as r:
        r.handshake()
        r.send(open_stream(1, method, {"zrpc-shard-key": "lobby"}, timeout_ms=0)
               + message(1, {"room": "lobby", "user": "u", "content": "c"}, end=True))
        kind, code, _ = r.outcome(1)
        assert (kind, code) == ("STATUS", Status.DEADLINE_EXCEEDED)
        # the deadline reaches the worker too: a routed call opened with 150 ms ends in time
        r.send(open_stream(3, "Chat/JoinChat", timeout_ms=150)
               + message(3, {"room": "lobby", "user": "u", "content": ""}))
        assert r.outcome(3)[:2] == ("STATUS", Status.DEADLINE_EXCEEDED)


@pytest.mark.parametrize("method", ["Health/Check", "Reflection/List", "Chat/SendMessage",
                                    "Chat/ListUsers"])
def test_unary_opened_with_end_and_no_message(broker: Live, method: str) -> None:
    with broker.raw() as r:
        r.handshake()
        r.send(open_stream(1, method, timeout_ms=None) + frame(F.END, 1))
        kind, code, text = r.outcome(1)
        assert (kind, code) == ("STATUS", Status.INVALID_ARGUMENT), text
        r.alive()


# ------------------------------------------------------------ 7. oversized responses


def test_responses_larger_than_the_clients_max_message_size(broker: Live) -> None:
    room = "oversize"

    async def post() -> None:
        c = await broker.client()
        for content in ("small", "x" * 3000, "after"):
            ack = await c.unary("Chat/SendMessage", Message(user="w", content=content, room=room),
                                ChatResponse, timeout=10)
            assert ack.type is ResponseType.ack
        await c.close()

    with broker.raw() as live_sub:
        live_sub.handshake(max_message_size=1000)
        live_sub.send(call(1, "Chat/SubscribeToRoom", {"room": room, "user": "small-client"}))
        # wait until the subscription is attached: its own user_joined arrives
        f = live_sub.next_frame(F.MESSAGE)
        assert f is not None and f[2] == 1
        uvloop.run(post())
        kind, code, text = live_sub.outcome(1)
        assert (kind, code) == ("STATUS", Status.RESOURCE_EXHAUSTED), text
        assert "max_message_size (1000)" in text
        with broker.raw() as replay:
            replay.handshake(max_message_size=1000)
            replay.send(call(1, "Chat/SubscribeToRoom", {"room": room, "user": "r", "since_id": 0}))
            kind, code, text = replay.outcome(1)
            assert (kind, code) == ("STATUS", Status.RESOURCE_EXHAUSTED), text
            assert "max_message_size (1000)" in text
            replay.alive()

    async def replay_all() -> list[str]:
        c = await broker.client()
        got: list[str] = []
        stream = await c.server_stream("Chat/SubscribeToRoom", SubscribeRequest(room=room, user="reader", since_id=0),
                                       ChatResponse)
        async for ev in stream:
            if ev.type is ResponseType.message:
                got.append(ev.message.content)
                if len(got) == 3:
                    break
        await stream.close()
        await c.close()
        return got

    # a client that accepts the size gets everything, in order
    assert uvloop.run(asyncio.wait_for(replay_all(), 20)) == ["small", "x" * 3000, "after"]



# ------------------------------------------------------------ 3. RSS after connections close


def test_rss_comes_back_after_connection_churn(broker: Live) -> None:
    """Rounds of TLS connections that send 64 KiB of garbage (and of normal calls) and close.

    Before the broker gave freed native memory back (zrpc/memory.py) this grew
    ~6 MiB per 200 garbage connections and never came back.
    """
    from bench.hostile import churn_round

    ctx = broker.ctx
    assert ctx is not None

    async def rounds(n: int, garbage: bool) -> None:
        for _ in range(n):
            assert await churn_round(broker.address, ctx, 100, garbage) == 0

    uvloop.run(rounds(2, True))  # warm: TLS session caches, buffers, code paths
    uvloop.run(rounds(2, False))
    first = settled_rss(broker)
    uvloop.run(rounds(6, True))
    uvloop.run(rounds(2, False))
    limit = first + 10 * 1024
    # the broker trims on its heartbeats after closes: poll (with a deadline) until it has
    wait_for(lambda: broker.rss_kib() <= limit, 15,
             what=f"broker RSS back within 10 MiB of {first // 1024} MiB (now {broker.rss_kib() // 1024} MiB)")


def settled_rss(broker: Live, window: float = 2.5) -> int:
    """The lowest broker RSS over ``window`` seconds (its heartbeats trim within that)."""
    low = broker.rss_kib()
    end = time.monotonic() + window
    while time.monotonic() < end:
        low = min(low, broker.rss_kib())
        time.sleep(0.05)  # sampling RSS over the window is the measurement itself
    return low
