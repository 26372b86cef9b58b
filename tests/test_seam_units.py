"""The broker's edge and the worker runtime in one process, no sockets: a real
:class:`~broker.broker.Broker` (never started) and a real :class:`~workers.runtime.Worker`
joined by an in-memory link (:mod:`cluster.link`'s interfaces), clients joined to
:class:`~broker.edge.EdgeSession` by in-memory pipes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgpack
import pytest
import uvloop

import zrpc
from broker.broker import Broker, BrokerConfig
from broker.edge import EdgeSession
from cluster import wire
from cluster.config import WorkerConfig
from cluster.link import OnEvent, OnMessage, OnWorkerMessage
from procs import eventually
from tests.apps.echo import app as echo_app
from workers.runtime import Worker
from zrpc.client import ClientSession
from zrpc.config import ClientConfig
from zrpc.protocol.frames import FrameType, encode_frame
from zrpc.status import Status

IDENTITY = b"worker-0"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return uvloop.run(coro)


class FakeBrokerEnd:
    """The broker's end: what it sends goes to the worker's end on the next loop turn."""

    endpoint = "memory://broker"

    def __init__(self) -> None:
        self.workers: dict[bytes, FakeWorkerEnd] = {}
        self.on_message: OnWorkerMessage | None = None
        self.on_event: OnEvent | None = None
        self.subscribed: set[str] = set()
        self.followed: list[str] = []
        self.sent: list[tuple[bytes, list[bytes]]] = []

    def start(self, on_message: OnWorkerMessage, on_event: OnEvent) -> None:
        self.on_message, self.on_event = on_message, on_event

    def send(self, worker: bytes, frames: list[bytes]) -> None:
        self.sent.append((worker, frames))
        end = self.workers.get(worker)
        if end is not None and end.on_message is not None:
            asyncio.get_running_loop().call_soon(end.on_message, frames)

    def follow(self, bus: str, key: bytes | None = None) -> None:
        self.followed.append(bus)

    def subscribe(self, topic: str) -> None:
        self.subscribed.add(topic)

    def unsubscribe(self, topic: str) -> None:
        self.subscribed.discard(topic)

    def close(self) -> None:
        self.workers.clear()


class FakeWorkerEnd:
    def __init__(self, broker: FakeBrokerEnd, identity: bytes) -> None:
        self.broker = broker
        self.identity = identity
        self.on_message: OnMessage | None = None
        self.opened = 0
        self.sent: list[list[bytes]] = []

    def open(self, on_message: OnMessage) -> None:
        self.opened += 1
        self.on_message = on_message
        self.broker.workers[self.identity] = self

    def send(self, frames: list[bytes]) -> None:
        self.sent.append(frames)
        if self.broker.on_message is not None:
            asyncio.get_running_loop().call_soon(self.broker.on_message, self.identity, frames)

    def close(self) -> None:
        self.on_message = None


class FakeBus:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, bytes]] = []

    def publish(self, topic: str, seq: int, payload: bytes) -> None:
        self.events.append((topic, seq, payload))

    def close(self) -> None:
        return None


class Cluster:
    """A broker and one worker (shard 0 of 1) in this process."""

    def __init__(self, tmp: Path) -> None:
        self.link = FakeBrokerEnd()
        self.broker = Broker(BrokerConfig(workers=0, shards=1, heartbeat_ms=100), link=self.link)
        self.link.start(self.broker._on_worker, self.broker._on_event)
        cfg = WorkerConfig(shard=0, shards=1, brokers=(self.link.endpoint,), bus="memory://bus",
                           data_dir=str(tmp), heartbeat_ms=100, app="tests.apps.echo:app")
        self.end = FakeWorkerEnd(self.link, IDENTITY)
        self.worker = Worker(cfg, echo_app, links=lambda ep: self.end, bus=FakeBus())
        self.blink = self.worker.links[0]

    async def start(self) -> None:
        self.blink.reconnect()  # READY
        await eventually(lambda: self.broker.registry.all_shards_owned(), 5, "registration")
        self.blink.registered.set()

    async def client(self, config: ClientConfig | None = None) -> tuple[zrpc.Client, EdgeSession]:
        loop = asyncio.get_running_loop()
        holder: dict[str, Any] = {}

        def to_edge(data: bytes) -> None:
            loop.call_soon(lambda: holder["edge"].closed or holder["edge"].data_received(data))

        def to_client(data: bytes) -> None:
            loop.call_soon(lambda: holder["client"].closed or holder["client"].data_received(data))

        def close() -> None:
            for s in holder.values():
                if not s.closed:
                    loop.call_soon(s.connection_lost, None)

        edge = EdgeSession(self.broker, self.broker.next_cid(), to_client, close, peer="memory")
        self.broker.sessions[edge.cid] = edge
        cfg = config or ClientConfig()
        session = ClientSession(cfg, to_edge, close)
        holder.update(edge=edge, client=session)
        session.start()
        await session.hello
        client = zrpc.Client(cfg)
        client.use_session(session)
        return client, edge


def with_cluster(tmp: Path, body: Callable[[Cluster], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        c = Cluster(tmp)
        await c.start()
        await body(c)
    run(main())


def test_calls_cross_edge_link_and_worker_in_memory(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        client, _ = await c.client()
        assert (await client.unary("Echo/Say", {"key": "k", "x": 1}, dict))["x"] == 1
        stream = await client.server_stream("Echo/Count", {"key": "k", "n": 50}, dict)
        assert [m["i"] async for m in stream] == list(range(50))
        await client.close()
    with_cluster(tmp_path, body)


def test_relay_chains_credit_with_a_small_client_window(tmp_path: Path) -> None:
    """A client with a 1 KiB stream window reading slowly: the broker never holds more than
    what the worker's window toward it allows, and every message arrives in order."""
    async def body(c: Cluster) -> None:
        cfg = ClientConfig(stream_config=zrpc.StreamConfig(buffer_size=1024))
        client, edge = await c.client(cfg)
        stream = await client.server_stream("Echo/Count", {"key": "k", "n": 300}, dict)
        got = []
        peak = 0
        async for m in stream:
            got.append(m["i"])
            peak = max(peak, max((len(r.outbox) for r in edge.relays.values()), default=0))
            await asyncio.sleep(0)
        assert got == list(range(300))
        # the worker's window toward the broker is the broker's stream window (256 KiB):
        # ~30-byte messages, so a bounded number wait at the edge
        assert 0 < peak <= 256 * 1024 // 20
        await client.close()
    with_cluster(tmp_path, body)


def test_worker_routes_stay_bounded_over_many_connections(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        for i in range(1000):
            client, _ = await c.client()
            await client.unary("Echo/Say", {"key": f"k{i}"}, dict)
            await client.close()
        await eventually(lambda: not c.blink.sessions, 5, "the worker's sessions to close")
        assert len(c.worker.routes) == 0
        assert len([s for s in c.broker.sessions.values() if s.internal_worker is None]) == 0
    with_cluster(tmp_path, body)


@pytest.mark.parametrize("msg", [
    [],
    [b"HB", b"\xc1not msgpack"],
    [b"HB", msgpack.packb([1, 2])],
    [b"A", b"no stream"],
    [b"R", msgpack.packb(["room", [[1]]])],
    [b"F", b"only-cid"],
    [b"C"],
    [b"ZZ", b"unknown command"],
    [b"READY", b"\xc1"],
])
def test_malformed_worker_messages_are_logged_and_dropped(tmp_path: Path, msg: list[bytes],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    async def body(c: Cluster) -> None:
        client, _ = await c.client()
        caplog.set_level(logging.WARNING)
        c.broker._on_worker(IDENTITY, msg)  # raises nothing
        # the worker is still registered and serves
        assert (await client.unary("Echo/Say", {"key": "k"}, dict))["key"] == "k"
        assert c.broker._malformed == 1 or "refusing worker" in caplog.text
        assert "Traceback" not in caplog.text
        await client.close()
    with_cluster(tmp_path, body)


def test_malformed_broker_messages_are_dropped_by_the_worker(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        for msg in ([b"G", b"junk"], [b"X"], [b"F", b"cid"], [b"??"], [b"G", msgpack.packb([1])]):
            c.blink.handle(msg)
        assert c.blink.malformed == 5
        client, _ = await c.client()
        assert (await client.unary("Echo/Say", {"key": "k"}, dict))["key"] == "k"
        await client.close()
    with_cluster(tmp_path, body)


def test_frames_for_a_dropped_session_are_answered_gone(tmp_path: Path) -> None:
    """A worker that dropped a broker's sessions (new epoch) answers frames of an old
    connection with GONE; the broker fails that connection's calls on that worker with
    UNAVAILABLE and the next call opens a fresh upstream (HELLO first)."""
    async def body(c: Cluster) -> None:
        client, _ = await c.client()
        assert (await client.unary("Echo/Say", {"key": "a"}, dict))["key"] == "a"
        stream = await client.bidirectional_stream("Echo/Chat", dict, dict)
        await stream.send({"key": "b", "n": 1})
        assert (await stream.receive())["n"] == 1
        epoch = c.blink.epoch
        c.blink.drop_all()  # as when the broker was silent for liveness
        assert c.blink.epoch == epoch + 1 and not c.blink.sessions
        await stream.send({"key": "b", "n": 2})  # frames of the dropped session
        with pytest.raises(zrpc.RpcError) as err:
            await asyncio.wait_for(stream.receive(), 5)
        assert err.value.status is Status.UNAVAILABLE
        assert any(frames[0] == wire.GONE for frames in c.end.sent)
        assert (await client.unary("Echo/Say", {"key": "c"}, dict))["key"] == "c"
        await client.close()

    with_cluster(tmp_path, body)


def test_ready_with_a_new_epoch_ends_the_streams_of_the_old_sessions(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        client, _ = await c.client()
        stream = await client.server_stream("Echo/Count", {"key": "k", "n": 10**9}, dict)
        await stream.__anext__()
        c.blink.drop_all()  # the worker dropped our sessions (new epoch) and registers again
        c.blink.reconnect()
        with pytest.raises(zrpc.RpcError) as err:
            async for _ in stream:
                pass
        assert err.value.status is Status.UNAVAILABLE
        assert "dropped this broker's sessions" in err.value.message
        assert (await client.unary("Echo/Say", {"key": "k"}, dict))["key"] == "k"
        await client.close()
    with_cluster(tmp_path, body)


def test_a_refused_worker_learns_whether_to_give_up(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        other = FakeWorkerEnd(c.link, b"worker-x")
        other.open(lambda frames: replies.append(frames))
        replies: list[list[bytes]] = []
        info = c.worker.ready_info()
        other.send([wire.READY, msgpack.packb({**info, "shards": 3})])
        other.send([wire.READY, msgpack.packb({**info, "pid": 1})])  # shard 0 is taken
        await eventually(lambda: len(replies) == 2, 5, "two refusals")
        assert [wire.refusal(r[1]) for r in replies] == [
            ("worker is configured for 3 shards; this broker runs 1", True),
            (f"shard 0 is already served by pid {info['pid']}", False),
        ]
    with_cluster(tmp_path, body)


def test_hello_frame_check_used_for_gone() -> None:
    hello = encode_frame(FrameType.HELLO, 0, 0, msgpack.packb({"version": 1}))
    assert hello[4:5] == bytes([FrameType.HELLO])


# ------------------------------------------------------------------ supervisor


def _config(tmp: Path) -> WorkerConfig:
    return WorkerConfig(shard=0, shards=1, brokers=("memory://b",), bus="memory://bus", data_dir=str(tmp))


def test_supervisor_gives_up_after_identical_start_up_failures(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import broker.supervisor as sup

    script = "import sys; print('zrpc-worker: cannot start: no such app', file=sys.stderr); sys.exit(2)"
    monkeypatch.setattr(sup, "worker_argv", lambda cfg: [sys.executable, "-c", script])

    async def main() -> None:
        exits: list[int] = []
        gave_up: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        s = sup.Supervisor([_config(tmp_path)], lambda shard, pid, code: exits.append(code),
                           lambda reason: gave_up.set_result(reason))
        t0 = asyncio.get_running_loop().time()
        await s.start()
        reason = await asyncio.wait_for(gave_up, 30)
        elapsed = asyncio.get_running_loop().time() - t0
        await s.stop()
        assert exits == [2] * sup.GIVE_UP_AFTER
        assert reason == ("worker for shard 0 failed 5 times at start-up (exit status 2): "
                          "zrpc-worker: cannot start: no such app")
        # backoff 0.1 + 0.2 + 0.4 + 0.8 s between the five attempts
        assert elapsed >= 1.5, elapsed
    run(main())


def _ignores_sigterm(pid: int) -> bool:
    """Whether ``pid`` has set SIGTERM to SIG_IGN (its ``SigIgn`` mask in /proc)."""
    import signal

    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def test_supervisor_kills_a_hung_worker_and_restarts_it(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import broker.supervisor as sup

    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    monkeypatch.setattr(sup, "worker_argv", lambda cfg: [sys.executable, "-c", script])

    async def main() -> None:
        exits: list[tuple[int, int]] = []
        s = sup.Supervisor([_config(tmp_path)], lambda shard, pid, code: exits.append((pid, code)))
        await s.start()
        try:
            await eventually(lambda: s.pids().get(0), 10, "the worker to start")
            first = s.pids()[0]
            s.worker_registered(first)
            await eventually(lambda: _ignores_sigterm(first), 10, "the worker to ignore SIGTERM")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await s.kill_hung(first)
            took = loop.time() - t0
            assert sup.KILL_GRACE_S <= took < sup.KILL_GRACE_S + 3, took
            await eventually(lambda: exits and exits[0] == (first, -9), 5, "SIGKILL")
            await eventually(lambda: s.pids().get(0) not in (None, first), 10, "a replacement")
        finally:
            await s.stop(timeout=1)
    run(main())
