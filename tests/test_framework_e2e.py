"""End-to-end tests of the zrpc framework: a real Client against a real Server.

Every scenario runs over real TLS on 127.0.0.1 (port 0, development certificates),
over QUIC (UDP, the same certificates) and, where it makes sense, through ``zrpc.testing.connect_in_memory`` (same
protocol, flow control and handlers, no sockets). Tests never sleep to wait
for something to happen: they wait on events/futures or poll a condition
with a deadline (:func:`eventually`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

import zrpc
import zrpc.session as zsession
from procs import eventually
from zrpc import Status
from zrpc.codec import encode
from zrpc.testing import connect_in_memory

TRANSPORTS = ["tls", "quic", "memory"]


# --------------------------------------------------------------------- messages


@dataclasses.dataclass
class Note:
    text: str
    n: int = 0


@dataclasses.dataclass
class Summary:
    count: int
    total: int
    texts: list[str]


@dataclasses.dataclass
class Blob:
    seq: int
    data: bytes


# ---------------------------------------------------------------------- helpers


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return uvloop.run(coro)


class Probe:
    """What the handlers report to the test (create inside the running loop)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        self.done = asyncio.Event()
        self.attempted = 0
        self.sent = 0
        self.slow_started = 0
        self.barrier: asyncio.Barrier | None = None


def make_service(probe: Probe) -> zrpc.Service:
    svc = zrpc.Service("T")

    async def gate() -> None:
        if probe.barrier is not None:
            await probe.barrier.wait()

    @svc.unary("Say", request=Note, response=Note)
    async def say(req: Note, ctx: zrpc.RequestContext) -> Note:
        await gate()
        return Note(req.text.upper(), req.n + 1)

    @svc.unary("Meta", request=Note, response=dict)
    async def meta(req: Note, ctx: zrpc.RequestContext) -> dict[str, Any]:
        return {"metadata": ctx.metadata, "method": ctx.method,
                "has_deadline": ctx.deadline is not None}

    @svc.client_stream("Sum", request=Note, response=Summary)
    async def summ(call: zrpc.ServerCall) -> Summary:
        await gate()
        texts, total = [], 0
        async for m in call:
            texts.append(m.text)
            total += m.n
        return Summary(len(texts), total, texts)

    @svc.server_stream("Count", request=Note, response=Note)
    async def count(req: Note, call: zrpc.ServerCall) -> None:
        await gate()
        for i in range(req.n):
            await call.send(Note(req.text, i))

    @svc.bidi("Chat", request=Note, response=Note)
    async def chat(call: zrpc.ServerCall) -> None:
        await gate()
        async for m in call:
            await call.send(Note(m.text + "!", m.n))

    @svc.bidi("Greet", request=Note, response=Note)
    async def greet(call: zrpc.ServerCall) -> None:
        await call.send(Note("welcome", 0))  # the server speaks first
        async for m in call:
            await call.send(Note(m.text + "!", m.n))

    @svc.unary("Hang", request=Note, response=Note)
    async def hang(req: Note, ctx: zrpc.RequestContext) -> Note:
        probe.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            probe.cancelled.set()
        raise AssertionError("unreachable")

    @svc.server_stream("HangStream", request=Note, response=Note)
    async def hang_stream(req: Note, call: zrpc.ServerCall) -> None:
        try:
            await call.send(Note("first", 0))
            probe.started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise

    @svc.bidi("HangChat", request=Note, response=Note)
    async def hang_chat(call: zrpc.ServerCall) -> None:
        try:
            probe.started.set()
            await asyncio.Event().wait()
        finally:
            probe.cancelled.set()

    @svc.server_stream("Abort", request=Note, response=Note)
    async def abort(req: Note, call: zrpc.ServerCall) -> None:
        await call.send(Note("a", 0))
        await call.send(Note("b", 1))
        raise zrpc.RpcError(Status.PERMISSION_DENIED, "not yours", {"who": req.text})

    @svc.unary("NotFound", request=Note, response=Note)
    async def not_found(req: Note, ctx: zrpc.RequestContext) -> Note:
        raise zrpc.RpcError(Status.NOT_FOUND, f"no note {req.text!r}")

    @svc.unary("BadDetails", request=Note, response=Note)
    async def bad_details(req: Note, ctx: zrpc.RequestContext) -> Note:
        raise zrpc.RpcError(Status.ABORTED, "conflict", details={"when": object()})

    @svc.unary("Boom", request=Note, response=Note)
    async def boom(req: Note, ctx: zrpc.RequestContext) -> Note:
        raise ValueError(f"boom {req.text}")

    @svc.client_stream("BoomSum", request=Note, response=Summary)
    async def boom_sum(call: zrpc.ServerCall) -> Summary:
        first = await call.recv()
        raise ValueError(f"cannot sum {first.text}")

    @svc.server_stream("Firehose", request=Note, response=Blob)
    async def firehose(req: Note, call: zrpc.ServerCall) -> None:
        payload = b"x" * 4096
        for i in range(req.n):
            probe.attempted = i + 1
            await call.send(Blob(i, payload))
            probe.sent = i + 1
        probe.done.set()

    @svc.unary("Slow", request=Note, response=Note)
    async def slow(req: Note, ctx: zrpc.RequestContext) -> Note:
        probe.slow_started += 1
        probe.started.set()
        await probe.release.wait()
        return Note("slow " + req.text, req.n)

    @svc.unary("Big", request=Blob, response=Blob)
    async def big(req: Blob, ctx: zrpc.RequestContext) -> Blob:
        return Blob(req.seq + 1, req.data)

    return svc


@contextlib.asynccontextmanager
async def serve(transport: str, *services: zrpc.Service,
                server_config: zrpc.ServerConfig | None = None,
                client_config: zrpc.ClientConfig | None = None,
                ) -> AsyncIterator[tuple[zrpc.Server, zrpc.Client]]:
    """A started server with ``services`` and a client connected to it over ``transport``."""
    server = zrpc.Server(server_config)
    for svc in services:
        server.add_service(svc)
    if transport == "tls":
        server.bind("127.0.0.1:0", zrpc.TlsConfig.development())
        ((_, port),) = await server.start()
        client = zrpc.Client(client_config)
        await client.connect(f"127.0.0.1:{port}", zrpc.TlsConfig.development())
    elif transport == "quic":
        server.bind_quic("127.0.0.1:0", zrpc.TlsConfig.development())
        await server.start()
        ((_, port),) = server.quic_addresses
        client = zrpc.Client(client_config)
        await client.connect(f"quic://127.0.0.1:{port}", zrpc.TlsConfig.development())
    else:
        client = await connect_in_memory(server, client_config)
    try:
        yield server, client
    finally:
        await client.close()
        await server.shutdown(grace=1)


def only_session(server: zrpc.Server) -> Any:
    assert len(server.sessions) == 1, server.sessions
    return next(iter(server.sessions))


# ------------------------------------------------------------- call patterns


@pytest.mark.parametrize(("transport", "runner"), [
    ("tls", uvloop.run), ("tls", asyncio.run), ("quic", uvloop.run), ("quic", asyncio.run),
    ("memory", uvloop.run),
], ids=["tls-uvloop", "tls-asyncio", "quic-uvloop", "quic-asyncio", "memory-uvloop"])
def test_four_call_patterns(transport: str, runner: Callable[[Any], Any]) -> None:
    async def main() -> None:
        async with serve(transport, make_service(Probe())) as (_, client):
            # unary
            assert await client.unary("T/Say", Note("hi", 1), Note) == Note("HI", 2)

            # client streaming
            up = await client.client_stream("T/Sum", Note, Summary)
            for i in range(10):
                await up.send(Note(f"m{i}", i))
            assert await up.close_and_receive() == Summary(10, 45, [f"m{i}" for i in range(10)])

            # server streaming with async for
            down = await client.server_stream("T/Count", Note("c", 5), Note)
            assert [m async for m in down] == [Note("c", i) for i in range(5)]

            # server streaming with next(): None at the end, and None again after it
            down = await client.server_stream("T/Count", Note("d", 3), Note)
            got = []
            while (m := await down.next()) is not None:
                got.append(m)
            assert got == [Note("d", 0), Note("d", 1), Note("d", 2)]
            assert await down.next() is None

            # an empty server stream ends at once
            empty = await client.server_stream("T/Count", Note("e", 0), Note)
            assert await empty.next() is None

            # bidirectional: interleaved, then half-close; receive() gives None at the end
            both = await client.bidirectional_stream("T/Chat", Note, Note)
            for i in range(3):
                await both.send(Note(f"b{i}", i))
                assert await both.receive() == Note(f"b{i}!", i)
            await both.close_send()
            assert await both.receive() is None

            # bidirectional with async for after sending everything
            both = await client.bidirectional_stream("T/Chat", Note, Note)
            for i in range(4):
                await both.send(Note("x", i))
            await both.close_send()
            assert [m.n async for m in both] == [0, 1, 2, 3]

            # metadata and the deadline reach the handler's context
            meta = await client.unary("T/Meta", Note("m"), dict, timeout=5,
                                      metadata={"trace-id": "abc"})
            assert meta == {"metadata": {"trace-id": "abc"}, "method": "T/Meta",
                            "has_deadline": True}
    runner(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bidi_where_server_speaks_first(transport: str) -> None:
    # No keepalive: no unrelated traffic may carry the OPEN out by accident.
    config = zrpc.ClientConfig(keepalive_interval_ms=None)

    async def main() -> None:
        async with serve(transport, make_service(Probe()), client_config=config) as (_, client):
            both = await client.bidirectional_stream("T/Greet", Note, Note)
            async with asyncio.timeout(5):
                assert await both.receive() == Note("welcome", 0)
                await both.send(Note("hi", 1))
                assert await both.receive() == Note("hi!", 1)
                await both.close_send()
                assert await both.receive() is None
    run(main())


# ------------------------------------------------------------------ deadlines


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_client_deadline_times_out_and_cancels_handler(transport: str) -> None:
    async def main() -> None:
        probe = Probe()
        async with serve(transport, make_service(probe)) as (server, client):
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(zrpc.Timeout) as err:
                await client.unary("T/Hang", Note("h"), Note, timeout=0.2)
            assert err.value.status is Status.DEADLINE_EXCEEDED
            assert loop.time() - t0 >= 0.15
            assert probe.started.is_set()
            await asyncio.wait_for(probe.cancelled.wait(), 5)
            # the connection is still usable
            assert await client.unary("T/Say", Note("ok"), Note) == Note("OK", 1)
            await eventually(lambda: not only_session(server).calls, 5, "server calls to drain")
    run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_server_default_deadline_applies_when_client_sends_none(transport: str) -> None:
    async def main() -> None:
        probe = Probe()
        async with serve(transport, make_service(probe),
                         server_config=zrpc.ServerConfig(request_timeout_ms=200),
                         client_config=zrpc.ClientConfig(request_timeout_ms=None)) as (_, client):
            with pytest.raises(zrpc.Timeout) as err:
                await asyncio.wait_for(client.unary("T/Hang", Note("h"), Note), 10)
            assert err.value.status is Status.DEADLINE_EXCEEDED
            await asyncio.wait_for(probe.cancelled.wait(), 5)
    run(main())


# --------------------------------------------------------------- cancellation


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancelling_client_task_cancels_unary_handler(transport: str) -> None:
    async def main() -> None:
        probe = Probe()
        async with serve(transport, make_service(probe)) as (server, client):
            task = asyncio.create_task(client.unary("T/Hang", Note("h"), Note, timeout=30))
            await asyncio.wait_for(probe.started.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(probe.cancelled.wait(), 5)
            await eventually(lambda: not only_session(server).calls, 5, "server calls to drain")
            assert await client.unary("T/Say", Note("after"), Note) == Note("AFTER", 1)
    run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_closing_server_stream_cancels_handler(transport: str) -> None:
    async def main() -> None:
        probe = Probe()
        async with serve(transport, make_service(probe)) as (_, client):
            stream = await client.server_stream("T/HangStream", Note("s"), Note)
            assert await stream.next() == Note("first", 0)
            await stream.close()
            await stream.close()  # safe twice
            await asyncio.wait_for(probe.cancelled.wait(), 5)
    run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancelling_task_blocked_in_bidi_receive_cancels_handler(transport: str) -> None:
    async def main() -> None:
        probe = Probe()
        async with serve(transport, make_service(probe)) as (_, client):
            both = await client.bidirectional_stream("T/HangChat", Note, Note)
            await both.send(Note("hello"))
            await asyncio.wait_for(probe.started.wait(), 5)
            task = asyncio.create_task(both.receive())
            await asyncio.sleep(0)  # let the task start waiting
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(probe.cancelled.wait(), 5)
            # the stream is over on the client side too
            with pytest.raises(zrpc.RpcError) as err:
                await both.receive()
            assert err.value.status is Status.CANCELLED
    run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancelling_task_blocked_in_send_cancels_handler(transport: str) -> None:
    """A sender waiting for credit that gets cancelled abandons the call (the handler is cancelled)."""
    async def main() -> None:
        probe = Probe()
        small = zrpc.ServerConfig(stream_config=zrpc.StreamConfig(buffer_size=1024))
        async with serve(transport, make_service(probe), server_config=small) as (_, client):
            both = await client.bidirectional_stream("T/HangChat", Note, Note)
            sent = 0

            async def flood() -> None:
                nonlocal sent
                for _ in range(100):
                    await both.send(Note("x" * 600))
                    sent += 1

            task = asyncio.create_task(flood())
            await asyncio.wait_for(probe.started.wait(), 5)
            await eventually(lambda: sent >= 1 and client.session is not None
                             and client.session.conn.send_credit(both.stream_id) <= 0, what="sender blocked")
            assert not task.done() and sent < 100
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(probe.cancelled.wait(), 5)
    run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_server_abort_status_reaches_client(transport: str) -> None:
    async def main() -> None:
        async with serve(transport, make_service(Probe())) as (_, client):
            stream = await client.server_stream("T/Abort", Note("mallory"), Note)
            assert await stream.next() == Note("a", 0)
            assert await stream.next() == Note("b", 1)
            with pytest.raises(zrpc.RpcError) as err:
                await stream.next()
            assert err.value.status is Status.PERMISSION_DENIED
            assert err.value.message == "not yours"
            assert err.value.details == {"who": "mallory"}

            with pytest.raises(zrpc.RpcError) as err:
                await client.unary("T/NotFound", Note("n1"), Note)
            assert err.value.status is Status.NOT_FOUND
            assert "n1" in err.value.message

            # details MessagePack cannot carry are dropped; the status still arrives
            with pytest.raises(zrpc.RpcError) as err:
                await client.unary("T/BadDetails", Note("d"), Note, timeout=5)
            assert err.value.status is Status.ABORTED
            assert err.value.message == "conflict"
            assert err.value.details is None
    run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_handler_exception_becomes_unknown(transport: str) -> None:
    async def main() -> None:
        async with serve(transport, make_service(Probe())) as (_, client):
            async with asyncio.timeout(10):  # an error must never turn into a hang
                with pytest.raises(zrpc.RpcError) as err:
                    await client.unary("T/Boom", Note("kaput"), Note)
                assert err.value.status is Status.UNKNOWN
                assert "ValueError" in err.value.message
                assert "boom kaput" in err.value.message

                up = await client.client_stream("T/BoomSum", Note, Summary)
                await up.send(Note("one", 1))
                with pytest.raises(zrpc.RpcError) as err:
                    # the handler fails after the first message; further sends may
                    # already see the stream closed: either way the status is UNKNOWN
                    for i in range(3):
                        await up.send(Note("more", i))
                    await up.close_and_receive()
                assert err.value.status is Status.UNKNOWN
                assert "cannot sum one" in err.value.message
            assert await client.unary("T/Say", Note("still"), Note) == Note("STILL", 1)
    run(main())


# ---------------------------------------------------------- invalid requests


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_request_types_are_invalid_argument(transport: str) -> None:
    async def main() -> None:
        async with serve(transport, make_service(Probe())) as (_, client):
            with pytest.raises(zrpc.RpcError) as err:
                await client.unary("T/Say", {"text": 5, "n": "five"}, Note)
            assert err.value.status is Status.INVALID_ARGUMENT
            assert "Note." in err.value.message

            with pytest.raises(zrpc.RpcError) as err:
                await client.unary("T/Say", {"n": 1}, Note)  # required field missing
            assert err.value.status is Status.INVALID_ARGUMENT
            assert "text" in err.value.message

            with pytest.raises(zrpc.RpcError) as err:
                await client.unary("T/Say", [1, 2, 3], Note)  # not a map at all
            assert err.value.status is Status.INVALID_ARGUMENT

            up = await client.client_stream("T/Sum", Note, Summary)
            await up.send(Note("fine", 1))
            await up.send({"text": "bad", "n": 1.5})
            with pytest.raises(zrpc.RpcError) as err:
                await up.close_and_receive()
            assert err.value.status is Status.INVALID_ARGUMENT

            both = await client.bidirectional_stream("T/Chat", Note, Note)
            await both.send({"text": ["not", "a", "string"]})
            with pytest.raises(zrpc.RpcError) as err:
                await both.receive()
            assert err.value.status is Status.INVALID_ARGUMENT
    run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_method_is_unimplemented(transport: str) -> None:
    async def main() -> None:
        async with serve(transport, make_service(Probe())) as (_, client):
            with pytest.raises(zrpc.RpcError) as err:
                await client.unary("T/Nope", Note("x"), Note)
            assert err.value.status is Status.UNIMPLEMENTED
            assert "T/Nope" in err.value.message

            down = await client.server_stream("Nope/Stream", Note("x"), Note)
            with pytest.raises(zrpc.RpcError) as err:
                await down.next()
            assert err.value.status is Status.UNIMPLEMENTED

            both = await client.bidirectional_stream("Nope/Chat", Note, Note)
            with pytest.raises(zrpc.RpcError) as err:
                await both.receive()
            assert err.value.status is Status.UNIMPLEMENTED
            assert await client.unary("T/Say", Note("ok"), Note) == Note("OK", 1)
    run(main())


# -------------------------------------------------------------- flow control


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_flow_control_blocks_fast_sender_until_client_reads(transport: str) -> None:
    window = 64 * 1024
    total = 200  # ~800 KB: far more than one window

    async def main() -> None:
        probe = Probe()
        client_config = zrpc.ClientConfig(stream_config=zrpc.StreamConfig(buffer_size=window))
        async with serve(transport, make_service(probe), client_config=client_config) as (server, client):
            size = len(encode(Blob(0, b"x" * 4096)))
            bound = window // size + 2  # the sender may overshoot the window by one message
            stream = await client.server_stream("T/Firehose", Note("f", total), Blob, timeout=30)
            session = only_session(server)
            sid = stream.stream_id

            # the handler ends up blocked inside send(): credit exhausted, a send pending
            # (send() may still be in its post-send yield when credit first reads <= 0, one message
            # short of probe.sent: wait until what the client holds matches what got out)
            inbox = stream._call.io._inbox
            await eventually(lambda: probe.attempted > probe.sent and session.conn.send_credit(sid) <= 0
                             and len(inbox) == probe.sent, 10, "the sender to block, the client to buffer")
            blocked_at = probe.sent
            assert window // size - 1 <= blocked_at <= bound, (blocked_at, bound)
            for _ in range(50):  # give the loop plenty of turns: nothing more may get out
                await asyncio.sleep(0)
            assert probe.sent == blocked_at
            assert not probe.done.is_set()

            # reading resumes the sender; every message arrives, in order
            seqs = []
            async for blob in stream:
                seqs.append(blob.seq)
                assert len(blob.data) == 4096
                assert len(inbox) <= bound  # memory stays bounded all along
            assert seqs == list(range(total))
            assert probe.sent == total
            await asyncio.wait_for(probe.done.wait(), 5)
    run(main())


# -------------------------------------------------------------- multiplexing


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_200_concurrent_streams_on_one_connection(transport: str) -> None:
    n_calls = 200

    async def main() -> None:
        probe = Probe()
        probe.barrier = asyncio.Barrier(n_calls)  # every handler waits until all 200 are open
        async with serve(transport, make_service(probe)) as (server, client):
            async def one(i: int) -> int:
                kind = i % 4
                if kind == 0:
                    assert await client.unary("T/Say", Note(f"u{i}", i), Note) == Note(f"U{i}", i + 1)
                elif kind == 1:
                    up = await client.client_stream("T/Sum", Note, Summary)
                    for k in range(5):
                        await up.send(Note(f"c{i}.{k}", k))
                    assert await up.close_and_receive() == Summary(
                        5, 10, [f"c{i}.{k}" for k in range(5)])
                elif kind == 2:
                    down = await client.server_stream("T/Count", Note(f"s{i}", 7), Note)
                    assert [m async for m in down] == [Note(f"s{i}", k) for k in range(7)]
                else:
                    both = await client.bidirectional_stream("T/Chat", Note, Note)
                    for k in range(5):
                        await both.send(Note(f"b{i}", k))
                    got = [await both.receive() for _ in range(5)]
                    assert got == [Note(f"b{i}!", k) for k in range(5)]
                    await both.close_send()
                    assert await both.receive() is None
                return i

            async with asyncio.timeout(30):
                results = await asyncio.gather(*(one(i) for i in range(n_calls)))
            assert results == list(range(n_calls))
            assert len(server.sessions) == 1  # all of it on one connection
            await eventually(lambda: not only_session(server).calls, 5, "server calls to drain")
    run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_calls_beyond_max_concurrent_streams_wait_for_a_free_slot(transport: str) -> None:
    async def main() -> None:
        probe = Probe()
        async with serve(transport, make_service(probe),
                         server_config=zrpc.ServerConfig(max_concurrent_streams=4)) as (_, client):
            # ten times more calls than the server accepts at once: all of them complete
            async with asyncio.timeout(10):
                got = await asyncio.gather(*(client.unary("T/Say", Note("x", i), Note)
                                             for i in range(40)))
            assert got == [Note("X", i + 1) for i in range(40)]

            # four calls hold every slot; three more wait; one waiter gives up
            holders = [asyncio.create_task(client.unary("T/Slow", Note(f"h{i}"), Note, timeout=20))
                       for i in range(4)]
            await eventually(lambda: probe.slow_started == 4, 5, "four calls in the handler")
            waiters = [asyncio.create_task(client.unary("T/Slow", Note(f"w{i}"), Note, timeout=20))
                       for i in range(3)]
            for _ in range(20):
                await asyncio.sleep(0)
            assert probe.slow_started == 4 and not any(w.done() for w in waiters)
            waiters[0].cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiters[0]
            probe.release.set()
            async with asyncio.timeout(10):
                done = await asyncio.gather(*holders, *waiters[1:])
            assert [m.text for m in done] == [f"slow h{i}" for i in range(4)] + ["slow w1", "slow w2"]
            assert probe.slow_started == 6
    run(main())


# ------------------------------------------------------- graceful shutdown


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_graceful_shutdown_lets_inflight_call_finish(transport: str) -> None:
    async def main() -> None:
        probe = Probe()
        async with serve(transport, make_service(probe)) as (server, client):
            inflight = asyncio.create_task(client.unary("T/Slow", Note("x", 7), Note, timeout=20))
            await asyncio.wait_for(probe.started.wait(), 5)
            shutdown = asyncio.create_task(server.shutdown(grace=20))
            session = client.session
            assert session is not None
            await eventually(lambda: session.goaway is not None, 5, "GOAWAY at the client")

            with pytest.raises(zrpc.RpcError) as err:  # ConnectionReset is an RpcError too
                await client.unary("T/Say", Note("late"), Note, timeout=5)
            assert err.value.status is Status.UNAVAILABLE
            assert not shutdown.done()
            assert not inflight.done()

            probe.release.set()
            assert await asyncio.wait_for(inflight, 5) == Note("slow x", 7)
            await asyncio.wait_for(shutdown, 5)
            assert not server.sessions
            assert server.dispatcher.serving is False
    run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shutdown_grace_expiry_cancels_inflight_call(transport: str) -> None:
    async def main() -> None:
        probe = Probe()
        async with serve(transport, make_service(probe)) as (server, client):
            inflight = asyncio.create_task(client.unary("T/Hang", Note("x"), Note, timeout=20))
            await asyncio.wait_for(probe.started.wait(), 5)
            await asyncio.wait_for(server.shutdown(grace=0.2), 5)
            with pytest.raises(zrpc.RpcError) as err:
                await asyncio.wait_for(inflight, 5)
            assert err.value.status is Status.UNAVAILABLE
            await asyncio.wait_for(probe.cancelled.wait(), 5)
    run(main())


def test_new_connections_refused_after_shutdown() -> None:
    async def main() -> None:
        async with serve("tls", make_service(Probe())) as (server, _client):
            port = server.addresses[0][1]
            await server.shutdown(grace=1)
            late = zrpc.Client(zrpc.ClientConfig(connect_timeout_ms=5000))
            with pytest.raises(zrpc.RpcError) as err:
                await late.connect(f"127.0.0.1:{port}", zrpc.TlsConfig.development())
            assert err.value.status is Status.UNAVAILABLE
    run(main())


# ------------------------------------------------------------------ keepalive


class Blackhole:
    """A TCP proxy that can stop forwarding: a peer that vanished without closing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent = False
        self.server_closed = asyncio.Event()  # the server's side of the proxied socket ended
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [cw, sw]
        for r, w, eof in ((cr, sw, None), (sr, cw, self.server_closed)):
            task = asyncio.create_task(self._pump(r, w, eof))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    eof: asyncio.Event | None) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if not self.silent:  # silent: swallow everything, answer nothing, keep the socket
                    writer.write(data)
        if eof is not None:
            eof.set()
        writer.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()


def test_keepalive_timeout_closes_silent_tls_peer() -> None:
    async def main() -> None:
        server = zrpc.Server(zrpc.ServerConfig(keepalive_interval_ms=50, keepalive_timeout_ms=100))
        server.bind("127.0.0.1:0", zrpc.TlsConfig.development())
        ((_, port),) = await server.start()
        proxy = Blackhole(port)
        proxy_port = await proxy.start()
        client = zrpc.Client(zrpc.ClientConfig(keepalive_interval_ms=None))
        try:
            await client.connect(f"127.0.0.1:{proxy_port}", zrpc.TlsConfig.development())
            assert await client.unary("Health/Check", {}, dict) == {"status": "SERVING"}
            session = only_session(server)
            # a healthy peer answers the PINGs: the connection outlives several timeouts
            await eventually(lambda: session.conn._ping_counter >= 4, 5, "several PINGs")
            assert not session.closed
            assert len(server.sessions) == 1

            proxy.silent = True  # from now on the peer answers nothing
            await eventually(lambda: session.closed, 5, "keepalive timeout")
            await eventually(lambda: not server.sessions, 5, "the session to be dropped")
            # and the socket itself is released although the peer never completes the TLS close
            await asyncio.wait_for(proxy.server_closed.wait(), 10)
        finally:
            await proxy.close()
            await client.close()
            await server.shutdown(grace=1)
    run(main())


def test_keepalive_timeout_closes_silent_in_memory_peer() -> None:
    async def main() -> None:
        server = zrpc.Server(zrpc.ServerConfig(keepalive_interval_ms=50, keepalive_timeout_ms=100))
        client = await connect_in_memory(server, zrpc.ClientConfig(keepalive_interval_ms=None))
        session = only_session(server)
        await eventually(lambda: session.conn._ping_counter >= 4, 5, "several PINGs")
        assert not session.closed
        assert client.session is not None
        # the pipe stops delivering to the client: PINGs go unanswered
        client.session.data_received = lambda data: None  # type: ignore[method-assign]
        await eventually(lambda: session.closed, 5, "keepalive timeout")
        await eventually(lambda: not server.sessions, 5, "the session to be dropped")
        await eventually(lambda: client.session is not None and client.session.closed, 5,
                         "the client side to see the close")
        with pytest.raises(zrpc.ConnectionReset):
            await client.unary("Health/Check", {}, dict)
        await server.shutdown(grace=1)
    run(main())


# ---------------------------------------------------------------- compression


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_compressed_10kb_message_round_trips(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    inflated: list[tuple[int, int]] = []
    real_decompress = zsession.decompress

    def spy(payload: bytes, max_size: int) -> bytes:
        out = real_decompress(payload, max_size)
        inflated.append((len(payload), len(out)))
        return out

    monkeypatch.setattr(zsession, "decompress", spy)
    stream_config = zrpc.StreamConfig(enable_compression=True, compression_threshold=100)
    data = b"".join(b"zrpc %05d compresses; " % i for i in range(500))[:10 * 1024]
    assert len(data) == 10 * 1024

    async def main() -> None:
        async with serve(transport, make_service(Probe()),
                         server_config=zrpc.ServerConfig(stream_config=stream_config),
                         client_config=zrpc.ClientConfig(stream_config=stream_config)) as (_, client):
            assert await client.unary("T/Big", Blob(1, data), Blob) == Blob(2, data)
            # request (at the server) and response (at the client) travelled compressed
            assert len(inflated) == 2
            assert all(wire < plain and plain > 10 * 1024 for wire, plain in inflated)
            # below the threshold nothing is compressed
            assert await client.unary("T/Say", Note("tiny"), Note) == Note("TINY", 1)
            assert len(inflated) == 2
    run(main())


# ------------------------------------------------------------------ builtins


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_health_and_reflection_builtins(transport: str) -> None:
    async def main() -> None:
        async with serve(transport, make_service(Probe())) as (_, client):
            assert await client.unary("Health/Check", {}, dict) == {"status": "SERVING"}
            listing = await client.unary("Reflection/List", {}, dict)
            methods = {m["name"]: m for m in listing["methods"]}
            assert methods["T/Say"] == {"name": "T/Say", "kind": "unary", "shard_key": None,
                                        "request": "Note", "response": "Note"}
            assert methods["T/Sum"]["kind"] == "client_stream"
            assert methods["T/Count"]["kind"] == "server_stream"
            assert methods["T/Chat"]["kind"] == "bidi"
            assert methods["T/Sum"]["response"] == "Summary"
            assert {"Health/Check", "Reflection/List"} <= methods.keys()
    run(main())


def test_max_connections_refuses_extra_connection(echo_service: Callable[..., zrpc.Service]) -> None:
    async def main() -> None:
        server = zrpc.Server(zrpc.ServerConfig(max_connections=1))
        server.add_service(echo_service())
        server.bind("127.0.0.1:0", zrpc.TlsConfig.development())
        ((_, port),) = await server.start()
        address = f"127.0.0.1:{port}"
        first, second, third = (zrpc.Client(zrpc.ClientConfig(connect_timeout_ms=5000))
                                for _ in range(3))
        try:
            await first.connect(address, zrpc.TlsConfig.development())
            assert await first.unary("Echo/Say", {"a": 1}, dict) == {"a": 1}
            with pytest.raises(zrpc.RpcError) as err:
                await second.connect(address, zrpc.TlsConfig.development())
            assert err.value.status is Status.UNAVAILABLE
            assert len(server.sessions) == 1
            # the first connection is unaffected
            assert await first.unary("Echo/Say", {"a": 2}, dict) == {"a": 2}
            # once it closes, its slot is free again
            await first.close()
            await eventually(lambda: not server.sessions, 5, "the slot to be freed")
            await third.connect(address, zrpc.TlsConfig.development())
            assert await third.unary("Health/Check", {}, dict) == {"status": "SERVING"}
        finally:
            for c in (first, second, third):
                await c.close()
            await server.shutdown(grace=1)
    run(main())
