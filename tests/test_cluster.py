"""Beyond one machine: real PostgreSQL, brokers and workers as separate processes.

PostgreSQL is a real server started for the session (tests/pgserver.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import uvloop
from pgserver import PostgresServer

import zrpc
from cluster.sharding import shard_for
from procs import BrokerProc, Proc, start_broker, start_worker, wait_for
from zrpc.chat import ChatResponse, Message, ResponseType
from zrpc.chat_client import Backoff, ChatClient

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


def stored_ids(url: str, room: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id FROM zrpc_messages WHERE room = %s ORDER BY id",
                            (room.encode(),)).fetchall()
    return [r[0] for r in rows]


async def connect(address: str, home: Path) -> zrpc.Client:
    os.environ["ZRPC_HOME"] = str(home)
    c = zrpc.Client()
    await c.connect(address)
    return c


async def send(c: zrpc.Client, room: str, user: str, text: str) -> Message:
    ack = await c.unary("Chat/SendMessage", Message(user=user, content=text, room=room), ChatResponse)
    assert ack.type is ResponseType.ack and ack.message is not None
    return ack.message


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    return pg_server.new_database()


@pytest.fixture
def pg_broker(tmp_path: Path, pg_url: str) -> Iterator[BrokerProc]:
    b = start_broker(tmp_path, "--store", pg_url, app=None)
    try:
        yield b.wait_ready()
    finally:
        b.stop()


def test_broker_store_flag_keeps_history_in_postgresql(pg_broker: BrokerProc, pg_url: str,
                                                       tmp_path: Path) -> None:
    rooms = {shard_for(f"room{i}", 2): f"room{i}" for i in range(20)}
    assert len(rooms) == 2

    async def main() -> None:
        c = await connect(pg_broker.address, tmp_path)
        for room in rooms.values():
            for i in range(1, 6):
                assert (await send(c, room, "alice", f"m{i}")).id == i
        await c.close()

    uvloop.run(main())
    for room in rooms.values():  # both shards' workers wrote to the one database
        assert stored_ids(pg_url, room) == [1, 2, 3, 4, 5]
    assert not list((tmp_path / "data").glob("*.sqlite"))


# -- shard fail-over: one shard, two workers sharing the store ------------------------

HEARTBEAT_MS, LIVENESS = 300, 3


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def lease_holder(url: str, shard: int = 0) -> tuple[int, int] | None:
    """(pid, token) of the worker holding ``shard``'s unexpired lease."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT holder, token FROM zrpc_leases WHERE shard = %s"
                           " AND expires_at > now()", (shard,)).fetchone()
    return None if row is None else (int(row[0].rsplit(":", 1)[1]), int(row[1]))


class OneShard:
    """A broker (tcp:// router, no workers of its own) and N workers for shard 0 of 1."""

    def __init__(self, home: Path, url: str) -> None:
        self.home, self.url = home, url
        self.router = f"tcp://127.0.0.1:{free_port()}"
        self.broker = start_broker(home, "--workers", "0", "--shards", "1", "--router", self.router,
                                   "--liveness", str(LIVENESS), app=None, heartbeat_ms=HEARTBEAT_MS)
        self.workers: dict[str, Proc] = {}

    def worker(self, name: str) -> Proc:
        args = ["--shard", "0", "--shards", "1", "--broker", self.router,
                "--bus", f"tcp://127.0.0.1:{free_port()}", "--store", self.url,
                "--heartbeat-ms", str(HEARTBEAT_MS), "--liveness", str(LIVENESS),
                "--chat-rate-per-s", "0"]
        p = self.workers[name] = start_worker(self.home, *args, name=name)
        return p

    def by_pid(self, pid: int) -> str:
        return next(name for name, p in self.workers.items() if p.pid == pid)

    def stop(self) -> None:
        for p in self.workers.values():
            p.signal(signal.SIGCONT)
            p.stop()
        self.broker.stop()


@pytest.fixture
def one_shard(tmp_path: Path, pg_url: str) -> Iterator[OneShard]:
    c = OneShard(tmp_path, pg_url)
    try:
        c.worker("w1")
        c.broker.wait_ready()  # w1 holds the lease and registered
        c.worker("w2")
        wait_for(lambda: "standing by" in c.workers["w2"].output(), what="w2 standing by")
        yield c
    finally:
        c.stop()


def run_load_through_failover(c: OneShard, fault: Callable[[Proc], None]) -> dict[str, float]:
    """Retrying keyed senders under load; ``fault`` hits the active worker once 60 sends
    were acked. Checks that every message is stored exactly once, ids contiguous, and
    returns timings: fault -> new lease holder, fault -> first ack served after it."""
    room, senders, per_sender, window = "lobby", 8, 40, 4
    active = lease_holder(c.url)
    assert active is not None
    victim = c.workers[c.by_pid(active[0])]
    timings: dict[str, float] = {}

    async def main() -> list[int]:
        tls = zrpc.TlsConfig.client(c.home)
        policy = Backoff(initial=0.02, maximum=0.3)
        clients = [await ChatClient.connect(c.broker.address, tls, timeout=60, retry=policy)
                   for _ in range(2)]
        acked: list[tuple[int, float]] = []

        async def sender(k: int) -> None:
            chat = clients[k % len(clients)]

            async def one(i: int) -> None:
                stored = await chat.send(room, f"u{k}", f"{k}-{i}")
                acked.append((stored.id, time.monotonic()))

            for w in range(0, per_sender, window):
                await asyncio.gather(*(one(i) for i in range(w, min(w + window, per_sender))))

        async def hit() -> None:
            while len(acked) < 60:
                await asyncio.sleep(0.005)
            timings["fault"] = time.monotonic()
            fault(victim)
            while True:
                holder = await asyncio.to_thread(lease_holder, c.url)
                if holder is not None and holder[1] > active[1]:
                    timings["lease"] = time.monotonic() - timings["fault"]
                    return
                await asyncio.sleep(0.05)  # polling the lease row for the takeover

        try:
            hitting = asyncio.ensure_future(hit())
            await asyncio.gather(*(sender(k) for k in range(senders)))
            await asyncio.wait_for(hitting, 30)
        finally:
            for chat in clients:
                await chat.close()
        after = [t for _, t in acked if t > timings["fault"]]
        assert after, "no send was acked after the fault"
        timings["first_ack"] = min(after) - timings["fault"]
        assert sum(cl.retries for cl in clients) > 0, "no send was retried: the fault missed the load"
        return [mid for mid, _ in acked]

    acked_ids = uvloop.run(main())
    total = senders * per_sender
    with psycopg.connect(c.url) as conn:
        rows = conn.execute("SELECT id, content FROM zrpc_messages WHERE room = %s ORDER BY id",
                            (room.encode(),)).fetchall()
    contents = [bytes(content).decode() for _, content in rows]
    assert [mid for mid, _ in rows] == list(range(1, total + 1))  # contiguous, nothing extra
    assert sorted(contents) == sorted(f"{k}-{i}" for k in range(senders) for i in range(per_sender))
    assert sorted(acked_ids) == list(range(1, total + 1))  # every ack names its own stored id
    print(f"fail-over: new lease holder after {timings['lease']:.2f} s, "
          f"first ack after {timings['first_ack']:.2f} s")
    return timings


def test_killed_active_worker_is_replaced_by_the_standby(one_shard: OneShard) -> None:
    t = run_load_through_failover(one_shard, lambda p: p.signal(signal.SIGKILL))
    assert t["lease"] > 0
    holder = lease_holder(one_shard.url)
    assert holder is not None and one_shard.by_pid(holder[0]) == "w2"


def test_a_frozen_active_worker_is_fenced_when_it_comes_back(one_shard: OneShard) -> None:
    """SIGSTOP cuts the active worker off from everything (broker, PostgreSQL); after SIGCONT
    it finds its lease taken, writes nothing (fenced) and exits 75 to come back as a standby."""
    frozen: list[Proc] = []

    def freeze(p: Proc) -> None:
        p.signal(signal.SIGSTOP)
        frozen.append(p)

    run_load_through_failover(one_shard, freeze)
    (old,) = frozen
    ids_before = stored_ids(one_shard.url, "lobby")
    old.signal(signal.SIGCONT)
    assert old.wait(30) == 75, old.output()
    assert "lost the lease of shard 0" in old.output()
    assert stored_ids(one_shard.url, "lobby") == ids_before
