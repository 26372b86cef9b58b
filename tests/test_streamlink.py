"""cluster.streamlink: the local broker <-> worker link's framing, over a real socket pair."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvloop

from cluster.streamlink import StreamLink, encode_message


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


def test_messages_split_anywhere_are_reassembled() -> None:
    got: list[list[bytes]] = []
    link = StreamLink(got.append)
    msgs = [[b"F", b"\x00" * 8, b"x" * 300], [b"HB"], [], [b"A", b"", b"\xff" * 70_000]]
    wire = b"".join(encode_message(m) for m in msgs)
    for step in (1, 3, 7, 4096, len(wire)):
        got.clear()
        for i in range(0, len(wire), step):
            link.data_received(wire[i:i + step])
        assert got == msgs, step
    assert not link._buf


def test_an_oversized_message_closes_the_link() -> None:
    async def main() -> None:
        got: list[list[bytes]] = []
        lost: list[bool] = []
        link = StreamLink(got.append, lambda: lost.append(True), max_message=1000)
        t = FakeTransport()
        link.connection_made(t)  # type: ignore[arg-type]
        link.data_received(encode_message([b"F", b"c", b"y" * 1001])[:20])  # the header is enough
        assert t.closed and got == []
        link.connection_lost(None)
        assert lost == [True]

    uvloop.run(main())


def test_sends_of_one_loop_iteration_are_coalesced_and_arrive_in_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        received: list[list[bytes]] = []
        done = loop.create_future()

        def on_b(parts: list[bytes]) -> None:
            received.append(parts)
            if len(received) == 1000 and not done.done():
                done.set_result(None)

        left = StreamLink(lambda parts: None)
        right = StreamLink(on_b)
        left.send([b"early"])  # before the connection is up: kept, then written
        await loop.create_unix_connection(lambda: left, sock=a)
        await loop.create_unix_connection(lambda: right, sock=b)
        for i in range(999):
            left.send([b"F", i.to_bytes(8, "big"), b"p" * (i % 50)])
        await asyncio.wait_for(done, 10)
        assert received[0] == [b"early"]
        assert [int.from_bytes(m[1], "big") for m in received[1:]] == list(range(999))
        # the early message once connected; of the 999 sent in one iteration, the first at
        # once and the other 998 coalesced into one write
        assert left.writes == 3, left.writes
        lost = loop.create_future()
        right.on_lost = lambda: lost.set_result(None)
        left.close()
        await asyncio.wait_for(lost, 10)
        right.send([b"after"])  # dropped quietly once closed

    uvloop.run(main())


def test_no_messages_are_delivered_after_a_close_inside_a_handler() -> None:
    got: list[Any] = []
    link: StreamLink

    def handle(parts: list[bytes]) -> None:
        got.append(parts)
        link.connection_lost(None)

    link = StreamLink(handle)
    link.data_received(encode_message([b"1"]) + encode_message([b"2"]))
    assert got == [[b"1"]]


def test_a_send_between_iterations_never_overtakes_queued_messages() -> None:
    """The first send of an iteration is written at once, the rest coalesced by a later
    callback; a send from a callback that runs after the iteration ended but before that
    flush must queue behind them (it used to be written first: frames reordered)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        link = StreamLink(lambda parts: None)
        t = FakeTransport()
        link.connection_made(t)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        done = loop.create_future()
        link.send([b"1"])            # written now; ends the iteration with call_soon
        # a callback that runs after the iteration's end but before the flush of "2" (as the
        # broker's next slice of a read does) sends too
        loop.call_soon(lambda: (link.send([b"3"]), done.set_result(None)))
        link.send([b"2"])            # queued: flushed by a call_soon after the one above
        await done
        await asyncio.sleep(0)
        got: list[list[bytes]] = []
        reader = StreamLink(got.append)
        reader.data_received(b"".join(t.written))
        assert got == [[b"1"], [b"2"], [b"3"]]

    uvloop.run(main())


def test_worker_end_without_a_broker_warns_once_and_connects_when_it_appears(
        tmp_path: Any, caplog: Any) -> None:
    from cluster.streamlink import UnixWorkerEnd

    async def main() -> None:
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "link.sock")
        end = UnixWorkerEnd(f"unix://{path}")
        end.open(lambda frames: None)
        for _ in range(5):
            end.send([b"HB"])  # dropped: nobody listens
        warnings = [r for r in caplog.records if "cannot connect" in r.getMessage()]
        assert len(warnings) == 1
        got = loop.create_future()
        server = await loop.create_unix_server(
            lambda: StreamLink(lambda frames: got.done() or got.set_result(frames)), path)
        end.send([b"READY"])
        assert await asyncio.wait_for(got, 10) == [b"READY"]
        end.close()
        server.close()

    uvloop.run(main())
