"""Every call a server accepts ends with exactly one STATUS.

Drives an in-process :class:`~zrpc.dispatch.ServerSession` with raw frames
(no socket: what it writes is decoded here) and checks the rules of
docs/protocol.md sections 4.2 and 10: deadlines run from the OPEN whether or
not a message arrives, ``timeout_ms = 0`` is already expired, a unary call
half-closed without its message gets INVALID_ARGUMENT, and a response or a
pushed event larger than the client's ``max_message_size`` ends the call with
RESOURCE_EXHAUSTED instead of being skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest
from conftest import make_echo_service

import zrpc
from zrpc.dispatch import Dispatcher, ServerSession
from zrpc.fanout import FanOut
from zrpc.protocol.frames import FrameDecoder, FrameFlag, FrameType, encode_frame
from zrpc.server import builtin_services
from zrpc.status import Status

F = FrameType
HELLO = {"version": 1, "max_message_size": 4 * 1024 * 1024, "max_concurrent_streams": 100,
         "initial_stream_window": 256 * 1024, "initial_connection_window": 4 * 1024 * 1024,
         "max_metadata_size": 16384}


class Wire:
    """One ServerSession fed raw frames; collects the frames it writes."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.decoder = FrameDecoder(2**32, 2**32)
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.changed = asyncio.Event()
        self.session = ServerSession(dispatcher, self._write, lambda: None, peer="test")

    def _write(self, data: bytes) -> None:
        self.frames.extend(self.decoder.feed(data))
        self.changed.set()

    def send(self, ftype: int, sid: int, body: Any = b"", flags: int = 0) -> None:
        payload = body if isinstance(body, bytes) else msgpack.packb(body)
        self.session.data_received(encode_frame(ftype, flags, sid, payload))

    def hello(self, **changes: Any) -> None:
        self.send(F.HELLO, 0, {**HELLO, **changes})

    def statuses(self, sid: int) -> list[tuple[int, str]]:
        return [tuple(msgpack.unpackb(p)[:2]) for t, _, s, p in self.frames
                if s == sid and t in (F.STATUS, F.RESET)]

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async def wait() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(wait(), timeout)

    async def ended(self, sid: int) -> tuple[int, str]:
        await self.until(lambda: bool(self.statuses(sid)))
        await self.until(lambda: sid not in self.session.calls)  # the call is cleaned up
        await asyncio.sleep(0.05)  # a second STATUS would be written by now (asserted below)
        (status,) = self.statuses(sid)
        return status


def dispatcher(*services: zrpc.Service, bus: Any = None, attach: Any = None) -> Dispatcher:
    d = Dispatcher(bus=bus, attach=attach)
    d.add_service(builtin_services(d))
    for svc in services:
        d.add_service(svc)
    return d


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


ran: list[str] = []


def slow_service() -> zrpc.Service:
    svc = zrpc.Service("Slow")

    @svc.unary("Never", request=dict, response=dict)
    async def never(request: Any, ctx: zrpc.RequestContext) -> Any:
        ran.append("Never")
        await asyncio.Event().wait()

    @svc.bidi("Idle", request=dict, response=dict)
    async def idle(call: zrpc.ServerCall) -> None:
        ran.append("Idle")
        await call.wait_closed()

    @svc.unary("Big", request=dict, response=dict)
    async def big(request: Any, ctx: zrpc.RequestContext) -> Any:
        return {"blob": "x" * request["n"]}

    return svc


@pytest.mark.parametrize("method", ["Health/Check", "Echo/Say", "Slow/Idle", "Echo/Collect"])
def test_deadline_runs_from_open_without_any_message(method: str) -> None:
    async def test() -> None:
        w = Wire(dispatcher(make_echo_service(), slow_service()))
        w.hello()
        w.send(F.OPEN, 1, [method, 100, {}])
        assert await w.ended(1) == (Status.DEADLINE_EXCEEDED, "deadline exceeded")
    run(test)


@pytest.mark.parametrize("method", ["Slow/Never", "Slow/Idle", "Health/Check"])
def test_timeout_zero_is_already_expired_and_the_handler_never_runs(method: str) -> None:
    async def test() -> None:
        ran.clear()
        w = Wire(dispatcher(slow_service()))
        w.hello()
        w.send(F.OPEN, 1, [method, 0, {}])
        w.send(F.MESSAGE, 1, {}, int(FrameFlag.END_STREAM))
        assert await w.ended(1) == (Status.DEADLINE_EXCEEDED, "deadline exceeded")
        assert ran == []
        # the connection goes on: a later call is served
        w.send(F.OPEN, 3, ["Health/Check", None, {}])
        w.send(F.MESSAGE, 3, {}, int(FrameFlag.END_STREAM))
        assert (await w.ended(3))[0] == Status.OK
    run(test)


def test_a_handler_that_swallows_cancellation_still_ends_once() -> None:
    async def test() -> None:
        svc = zrpc.Service("Stubborn")

        @svc.unary("Call", request=dict, response=dict)
        async def stubborn(request: Any, ctx: zrpc.RequestContext) -> Any:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass
            return {"late": True}

        w = Wire(dispatcher(svc))
        w.hello()
        w.send(F.OPEN, 1, ["Stubborn/Call", 50, {}])
        w.send(F.MESSAGE, 1, {}, int(FrameFlag.END_STREAM))
        assert await w.ended(1) == (Status.DEADLINE_EXCEEDED, "deadline exceeded")
        assert not [f for f in w.frames if f[0] == F.MESSAGE and f[2] == 1]
    run(test)


@pytest.mark.parametrize("method", ["Health/Check", "Reflection/List", "Echo/Say", "Echo/Repeat"])
def test_unary_opened_with_end_and_no_message_gets_invalid_argument(method: str) -> None:
    async def test() -> None:
        w = Wire(dispatcher(make_echo_service()))
        w.hello()
        w.send(F.OPEN, 1, [method, None, {}])
        w.send(F.END, 1)
        code, text = await w.ended(1)
        assert code == Status.INVALID_ARGUMENT and "expects one request message" in text
    run(test)


def test_response_larger_than_the_clients_max_message_size() -> None:
    async def test() -> None:
        w = Wire(dispatcher(slow_service()))
        w.hello(max_message_size=1000)
        w.send(F.OPEN, 1, ["Slow/Big", None, {}])
        w.send(F.MESSAGE, 1, {"n": 5000}, int(FrameFlag.END_STREAM))
        code, text = await w.ended(1)
        assert code == Status.RESOURCE_EXHAUSTED and "max_message_size (1000)" in text, text
        w.send(F.OPEN, 3, ["Slow/Big", None, {}])
        w.send(F.MESSAGE, 3, {"n": 10}, int(FrameFlag.END_STREAM))
        assert (await w.ended(3))[0] == Status.OK
    run(test)


def test_pushed_event_larger_than_the_clients_max_message_size_ends_the_stream() -> None:
    async def test() -> None:
        fanout = FanOut()
        svc = zrpc.Service("Topic")

        @svc.bidi("Follow", request=dict, response=dict)
        async def follow(call: zrpc.ServerCall) -> None:
            call.attach("t", 0)
            await call.wait_closed()

        d = dispatcher(svc, attach=lambda call, topic, after: fanout.attach(topic, call, after),
                       bus=None)
        d.detach = lambda call: [fanout.detach(t, call) for t in call.topics]
        w = Wire(d)
        w.hello(max_message_size=1000)
        w.send(F.OPEN, 1, ["Topic/Follow", None, {}])
        await w.until(lambda: "t" in fanout.topics)
        fanout.publish("t", 1, msgpack.packb({"small": 1}))
        fanout.publish("t", 2, msgpack.packb({"big": "x" * 5000}))  # must not raise here
        code, text = await w.ended(1)
        assert code == Status.RESOURCE_EXHAUSTED and "max_message_size (1000)" in text, text
        assert len([f for f in w.frames if f[0] == F.MESSAGE and f[2] == 1]) == 1
        assert "t" not in fanout.topics  # detached
    run(test)
