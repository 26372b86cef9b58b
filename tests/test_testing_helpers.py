"""Tests of zrpc.testing: connect_in_memory and the MockServer."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

import zrpc
from procs import eventually
from zrpc import Status
from zrpc.dispatch import Dispatcher
from zrpc.testing import MockServer, connect_in_memory


@dataclasses.dataclass
class Msg:
    text: str
    n: int = 0


# ------------------------------------------------------------ connect_in_memory


@pytest.mark.parametrize("target", ["server", "dispatcher"])
def test_connect_in_memory_serves_all_patterns(target: str,
                                               echo_service: Callable[..., zrpc.Service]) -> None:
    async def main() -> None:
        if target == "server":
            server: zrpc.Server | Dispatcher = zrpc.Server()
            server.add_service(echo_service())
        else:
            server = Dispatcher()
            server.add_service(echo_service())
        client = await connect_in_memory(server)
        try:
            assert await client.unary("Echo/Say", {"hello": [1, 2]}, dict) == {"hello": [1, 2]}
            up = await client.client_stream("Echo/Collect", dict, dict)
            for i in range(3):
                await up.send({"i": i})
            assert await up.close_and_receive() == {"items": [{"i": 0}, {"i": 1}, {"i": 2}]}
            down = await client.server_stream("Echo/Repeat", {"n": 4}, dict)
            assert [m["i"] async for m in down] == [0, 1, 2, 3]
            assert await down.next() is None
            both = await client.bidirectional_stream("Echo/Chat", dict, dict)
            await both.send({"x": 1})
            assert await both.receive() == {"x": 1}
            await both.close_send()
            assert await both.receive() is None
        finally:
            await client.close()
    uvloop.run(main())


def test_connect_in_memory_passes_token_to_authenticator() -> None:
    seen: list[tuple[dict[str, Any], Any]] = []

    def authenticate(hello: dict[str, Any], peer: Any) -> tuple[str, dict[str, Any]]:
        seen.append((hello, peer))
        if hello.get("token") != "s3cret":
            raise zrpc.RpcError(Status.UNAUTHENTICATED, "bad token")
        return "alice", {"role": "admin"}

    svc = zrpc.Service("Who")

    @svc.unary("Ami", request=dict, response=dict)
    async def ami(request: Any, ctx: zrpc.RequestContext) -> Any:
        return {"identity": ctx.identity, "claims": ctx.claims, "peer": ctx.peer}

    async def main() -> None:
        server = zrpc.Server(authenticator=authenticate)
        server.add_service(svc)
        client = await connect_in_memory(server, token="s3cret")
        assert await client.unary("Who/Ami", {}, dict) == {
            "identity": "alice", "claims": {"role": "admin"}, "peer": "in-memory"}
        await client.close()

        with pytest.raises(zrpc.RpcError) as err:
            await asyncio.wait_for(connect_in_memory(server, token="wrong"), 5)
        assert err.value.status is Status.UNAUTHENTICATED
        assert [h.get("token") for h, _ in seen] == ["s3cret", "wrong"]
        await eventually(lambda: not server.sessions, what="refused session to be dropped")
        await server.shutdown(grace=1)
    uvloop.run(main())


def test_closing_in_memory_client_releases_server_session() -> None:
    cancelled: list[bool] = []
    svc = zrpc.Service("Hang")

    @svc.bidi("Forever", request=dict, response=dict)
    async def forever(call: zrpc.ServerCall) -> None:
        try:
            await call.send({"ready": True})
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> None:
        server = zrpc.Server()
        server.add_service(svc)
        client = await connect_in_memory(server)
        assert len(server.sessions) == 1
        both = await client.bidirectional_stream("Hang/Forever", dict, dict)
        assert await both.receive() == {"ready": True}
        await client.close()
        with pytest.raises(zrpc.RpcError) as err:
            await both.receive()
        assert err.value.status in (Status.CANCELLED, Status.UNAVAILABLE)
        await eventually(lambda: cancelled == [True], what="the handler to be cancelled")
        await eventually(lambda: not server.sessions, what="the server session to be dropped")
        await asyncio.wait_for(server.shutdown(grace=1), 5)
    uvloop.run(main())


# ------------------------------------------------------------------ MockServer


def test_mock_server_all_four_patterns_then_verify_passes() -> None:
    async def main() -> None:
        mock = MockServer()
        mock.expect_unary("Chat/Send", Msg("hi"), Msg("ok", 1))
        mock.expect_client_stream("Chat/Batch", [Msg("a"), Msg("b", 2)], Msg("got 2", 2))
        mock.expect_server_stream("Chat/Subscribe", Msg("room"), [Msg("m1", 1), Msg("m2", 2)])
        mock.expect_bidirectional_stream("Chat/Join", [
            (Msg("join"), Msg("welcome")),
            (Msg("quiet"), None),  # no reply to this one
            (Msg("hello"), Msg("echo hello")),
        ])
        client = await mock.client()

        assert await client.unary("Chat/Send", Msg("hi"), Msg) == Msg("ok", 1)

        up = await client.client_stream("Chat/Batch", Msg, Msg)
        await up.send(Msg("a"))
        await up.send(Msg("b", 2))
        assert await up.close_and_receive() == Msg("got 2", 2)

        down = await client.server_stream("Chat/Subscribe", Msg("room"), Msg)
        assert [m async for m in down] == [Msg("m1", 1), Msg("m2", 2)]

        both = await client.bidirectional_stream("Chat/Join", Msg, Msg)
        await both.send(Msg("join"))
        assert await both.receive() == Msg("welcome")
        await both.send(Msg("quiet"))
        await both.send(Msg("hello"))
        assert await both.receive() == Msg("echo hello")
        await both.close_send()
        assert await both.receive() is None

        mock.verify()
        assert mock.failures == []
        await client.close()
    uvloop.run(main())


def test_mock_server_expectations_are_consumed_in_order_and_can_be_added_later() -> None:
    async def main() -> None:
        mock = MockServer()
        mock.expect_unary("Calc/Next", Msg("q"), Msg("first", 1))
        mock.expect_unary("Calc/Next", Msg("q"), Msg("second", 2))
        client = await mock.client()
        assert await client.unary("Calc/Next", Msg("q"), Msg) == Msg("first", 1)
        assert await client.unary("Calc/Next", Msg("q"), Msg) == Msg("second", 2)
        mock.verify()
        # a new expectation for a method whose script is used up
        mock.expect_unary("Calc/Next", Msg("r"), Msg("third", 3))
        assert await client.unary("Calc/Next", Msg("r"), Msg) == Msg("third", 3)
        mock.expect_server_stream("Calc/Feed", Msg("f"), [Msg("x")])
        down = await client.server_stream("Calc/Feed", Msg("f"), Msg)
        assert [m async for m in down] == [Msg("x")]
        mock.expect_server_stream("Calc/Feed", Msg("g"), [])
        down = await client.server_stream("Calc/Feed", Msg("g"), Msg)
        assert await down.next() is None
        mock.verify()
        await client.close()
    uvloop.run(main())


def test_mock_server_refuses_a_second_pattern_for_one_method() -> None:
    mock = MockServer()
    mock.expect_unary("Calc/Next", Msg("q"), Msg("a"))
    with pytest.raises(ValueError, match="unary"):
        mock.expect_server_stream("Calc/Next", Msg("q"), [Msg("a")])
    with pytest.raises(AssertionError, match="1 expected call"):
        mock.verify()  # the rejected expectation was not queued; the unary one is unused


def test_mock_server_verify_reports_unused_expectations() -> None:
    async def main() -> None:
        mock = MockServer()
        mock.expect_unary("Chat/Send", Msg("hi"), Msg("ok"))
        mock.expect_unary("Chat/Send", Msg("again"), Msg("ok"))
        mock.expect_bidirectional_stream("Chat/Join", [(Msg("join"), Msg("welcome"))])
        client = await mock.client()
        assert await client.unary("Chat/Send", Msg("hi"), Msg) == Msg("ok")
        with pytest.raises(AssertionError) as err:
            mock.verify()
        text = str(err.value)
        assert "Chat/Send: 1 expected call(s) never made" in text
        assert "Chat/Join: 1 expected call(s) never made" in text
        await client.close()
    uvloop.run(main())


def test_mock_server_unexpected_extra_call_fails_and_is_reported() -> None:
    async def main() -> None:
        mock = MockServer()
        mock.expect_unary("Chat/Send", Msg("hi"), Msg("ok"))
        client = await mock.client()
        assert await client.unary("Chat/Send", Msg("hi"), Msg) == Msg("ok")
        with pytest.raises(zrpc.RpcError) as err:
            await client.unary("Chat/Send", Msg("hi"), Msg)
        assert err.value.status is Status.FAILED_PRECONDITION
        with pytest.raises(AssertionError, match="unexpected call to Chat/Send"):
            mock.verify()
        # a method never scripted at all is simply unknown to the mock
        with pytest.raises(zrpc.RpcError) as err:
            await client.unary("Other/Thing", Msg("x"), Msg)
        assert err.value.status is Status.UNIMPLEMENTED
        await client.close()
    uvloop.run(main())


async def _mismatch_unary(mock: MockServer, client: zrpc.Client) -> None:
    mock.expect_unary("M/Unary", Msg("expected", 1), Msg("r"))
    await client.unary("M/Unary", Msg("actual", 1), Msg)


async def _mismatch_client_stream(mock: MockServer, client: zrpc.Client) -> None:
    mock.expect_client_stream("M/Up", [Msg("a"), Msg("b")], Msg("r"))
    up = await client.client_stream("M/Up", Msg, Msg)
    await up.send(Msg("a"))
    await up.send(Msg("B"))
    await up.close_and_receive()


async def _mismatch_server_stream(mock: MockServer, client: zrpc.Client) -> None:
    mock.expect_server_stream("M/Down", Msg("room", 1), [Msg("r")])
    down = await client.server_stream("M/Down", Msg("room", 2), Msg)
    async for _ in down:
        pass


async def _mismatch_bidi(mock: MockServer, client: zrpc.Client) -> None:
    mock.expect_bidirectional_stream("M/Both", [(Msg("one"), Msg("1")), (Msg("two"), Msg("2"))])
    both = await client.bidirectional_stream("M/Both", Msg, Msg)
    await both.send(Msg("one"))
    assert await both.receive() == Msg("1")
    await both.send(Msg("three"))
    await both.receive()


async def _bidi_ended_early(mock: MockServer, client: zrpc.Client) -> None:
    mock.expect_bidirectional_stream("M/Both", [(Msg("one"), Msg("1")), (Msg("two"), Msg("2"))])
    both = await client.bidirectional_stream("M/Both", Msg, Msg)
    await both.send(Msg("one"))
    assert await both.receive() == Msg("1")
    await both.close_send()
    await both.receive()


@pytest.mark.parametrize(("scenario", "method", "detail"), [
    (_mismatch_unary, "M/Unary", "'text': 'actual'"),
    (_mismatch_client_stream, "M/Up", "'text': 'B'"),
    (_mismatch_server_stream, "M/Down", "'n': 2"),
    (_mismatch_bidi, "M/Both", "'text': 'three'"),
    (_bidi_ended_early, "M/Both", "client ended the stream"),
], ids=["unary", "client_stream", "server_stream", "bidi", "bidi_ended_early"])
def test_mock_server_reports_request_that_differs(scenario: Any, method: str, detail: str) -> None:
    async def main() -> None:
        mock = MockServer()
        client = await mock.client()
        with pytest.raises(zrpc.RpcError) as err:
            async with asyncio.timeout(5):  # a mismatch must fail the call, never hang it
                await scenario(mock, client)
        assert err.value.status is Status.FAILED_PRECONDITION
        assert err.value.message.startswith("mock: ")
        with pytest.raises(AssertionError) as failed:
            mock.verify()
        text = str(failed.value)
        assert "mock expectations not met" in text
        assert method in text
        assert detail in text
        await client.close()
    uvloop.run(main())


def test_mock_server_verify_lists_every_problem() -> None:
    async def main() -> None:
        mock = MockServer()
        mock.expect_unary("P/One", Msg("a"), Msg("r"))
        mock.expect_unary("P/Two", Msg("b"), Msg("r"))
        mock.expect_unary("P/Three", Msg("c"), Msg("r"))
        client = await mock.client()
        with pytest.raises(zrpc.RpcError):
            await client.unary("P/One", Msg("wrong"), Msg)
        assert await client.unary("P/Two", Msg("b"), Msg) == Msg("r")
        with pytest.raises(AssertionError) as failed:
            mock.verify()
        lines = str(failed.value).splitlines()[1:]
        assert len(lines) == 2, lines
        assert "P/One: expected request" in lines[0] and "'wrong'" in lines[0]
        assert "P/Three: 1 expected call(s) never made" in lines[1]
        await client.close()
    uvloop.run(main())
