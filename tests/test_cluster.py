"""Beyond one machine: real PostgreSQL, brokers and workers as separate processes.

PostgreSQL is a real server started for the session (tests/pgserver.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import uvloop
from netns import Hosts
from pgserver import PostgresServer, require_postgres

import zrpc
from cluster.sharding import shard_for
from procs import BIN, BrokerProc, Proc, env_for, start_broker, wait_for
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


# -- shard fail-over over CurveZMQ, each worker on its own "host" ----------------------

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


@dataclass
class Net:
    """Worker hosts, a PostgreSQL they reach, and two CurveZMQ key sets (the second unknown)."""

    hosts: Hosts
    pg: PostgresServer
    keys: Path
    wrong_keys: Path


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    bindir = require_postgres()
    base = tmp_path_factory.mktemp("cluster")
    for name in ("keys", "wrong-keys"):  # through the command operators use
        subprocess.run([str(BIN / "zrpc-broker"), "keys", "create", str(base / name)], check=True,
                       env=env_for(base), capture_output=True, timeout=60)
    # The intruder knows the brokers' public key (it is public), not an authorized secret.
    shutil.copy(base / "keys" / "broker.key", base / "wrong-keys" / "broker.key")
    hosts = Hosts(3)
    pg = PostgresServer(bindir, also_listen=hosts.db_addresses())
    try:
        pg.start()
        yield Net(hosts, pg, base / "keys", base / "wrong-keys")
    finally:
        try:
            pg.stop()
        finally:
            hosts.close()


class OneShard:
    """A broker (tcp:// router with Curve keys, no workers of its own) and workers for
    shard 0 of 1, worker ``i`` on worker host ``i``."""

    def __init__(self, home: Path, net: Net) -> None:
        self.home, self.net = home, net
        self.db = net.pg.new_database().rsplit("/", 1)[1]
        self.url = net.pg.url(self.db)
        self.port = free_port()
        bind = "0.0.0.0" if net.hosts.netns else "127.0.0.1"
        self.broker = start_broker(home, "--workers", "0", "--shards", "1",
                                   "--router", f"tcp://{bind}:{self.port}",
                                   "--cluster-keys", str(net.keys), "--liveness", str(LIVENESS),
                                   app=None, heartbeat_ms=HEARTBEAT_MS)
        self.workers: dict[int, Proc] = {}  # by host
        self.extra: list[Proc] = []  # more processes on a host

    def worker(self, i: int, keys: Path | None = None, store: bool = True,
               plaintext: bool = False, name: str = "") -> Proc:
        hosts, me, broker = self.net.hosts, self.net.hosts.address(i), self.net.hosts.broker_side(i)
        security = (["--cluster-insecure"] if plaintext
                    else ["--cluster-keys", str(keys or self.net.keys)])
        args = ["--shard", "0", "--shards", "1", "--broker", f"tcp://{broker}:{self.port}",
                "--bus", f"tcp://{me}:{free_port()}", *security,
                "--heartbeat-ms", str(HEARTBEAT_MS), "--liveness", str(LIVENESS),
                "--chat-rate-per-s", "0"]
        db = hosts.db_side(i)
        args += (["--store", f"postgresql://postgres@{db}:{self.net.pg.port}/{self.db}"]
                 if store else ["--data-dir", str(self.home / f"data-{i}")])
        argv = [*hosts.prefix(i), str(BIN / "zrpc-worker"), *args]
        p = Proc(argv, env_for(self.home), self.home / f"{name or f'w{i}'}.log").start()
        if name:
            self.extra.append(p)
        else:
            self.workers[i] = p
        return p

    def host_of(self, pid: int) -> int:
        return next(i for i, p in self.workers.items() if p.pid == pid)

    def stop(self) -> None:
        for i, p in self.workers.items():
            if self.net.hosts.netns:
                self.net.hosts.heal(i)
            p.signal(signal.SIGCONT)
            p.stop()
        for p in self.extra:
            p.stop()
        self.broker.stop()


@pytest.fixture
def one_shard(tmp_path: Path, net: Net) -> Iterator[OneShard]:
    c = OneShard(tmp_path, net)
    try:
        c.worker(1)
        c.broker.wait_ready()  # w1 holds the lease and registered, over CurveZMQ
        c.worker(2)
        wait_for(lambda: "standing by" in c.workers[2].output(), what="w2 standing by")
        yield c
    finally:
        c.stop()


def run_load_through_failover(c: OneShard, fault: Callable[[int], None]) -> dict[str, float]:
    """Retrying keyed senders under load; ``fault(host)`` hits the active worker's host once
    60 sends were acked. Checks that every message is stored exactly once, ids contiguous,
    and returns timings: fault -> new lease holder, and the longest time without an ack."""
    room, senders, per_sender, window = "lobby", 8, 40, 4
    active = lease_holder(c.url)
    assert active is not None
    victim = c.host_of(active[0])
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
        times = sorted(t for _, t in acked)
        before = [t for t in times if t <= timings["fault"]]
        after = [t for t in times if t > timings["fault"]]
        assert after, "no send was acked after the fault"
        # the outage: the longest time without any ack around the fault
        timings["outage"] = max(b - a for a, b in zip([before[-1], *after], after, strict=False))
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
    print(f"fail-over ({'netns' if c.net.hosts.netns else 'loopback'}): new lease holder after "
          f"{timings['lease']:.2f} s, longest time without an ack {timings['outage']:.2f} s")
    return timings


def test_killed_active_worker_is_replaced_by_the_standby(one_shard: OneShard) -> None:
    run_load_through_failover(one_shard, lambda i: one_shard.workers[i].signal(signal.SIGKILL))
    holder = lease_holder(one_shard.url)
    assert holder is not None and one_shard.host_of(holder[0]) == 2


def test_partitioned_active_worker_cannot_write_after_it_heals(one_shard: OneShard) -> None:
    """The active worker's host loses its link (network namespaces; without them the
    process is frozen with SIGSTOP): the standby takes over; once the link is back, the
    old worker finds its lease taken, writes nothing (fenced) and exits 75."""
    c, hosts = one_shard, one_shard.net.hosts
    cut: list[int] = []

    def partition(i: int) -> None:
        hosts.partition(i) if hosts.netns else c.workers[i].signal(signal.SIGSTOP)
        cut.append(i)

    run_load_through_failover(c, partition)
    (old,) = cut
    ids_before = stored_ids(c.url, "lobby")
    hosts.heal(old) if hosts.netns else c.workers[old].signal(signal.SIGCONT)
    assert c.workers[old].wait(30) == 75, c.workers[old].output()
    assert "lost the lease of shard 0" in c.workers[old].output()
    assert stored_ids(c.url, "lobby") == ids_before


def test_active_worker_cut_off_from_the_brokers_only_hands_the_shard_over(
        one_shard: OneShard) -> None:
    """The active worker still reaches PostgreSQL (it keeps renewing its lease) but no
    broker: after two lease lifetimes without a broker it gives the lease back and exits 75,
    and the standby, which the brokers can reach, serves the shard."""
    c, hosts = one_shard, one_shard.net.hosts
    if not hosts.netns:
        why = f"a partial partition needs network namespaces ({hosts.why_not})"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    cut: list[int] = []

    def cut_brokers(i: int) -> None:
        hosts.partition(i, database=False)
        cut.append(i)

    run_load_through_failover(c, cut_brokers)
    (old,) = cut
    assert c.workers[old].wait(30) == 75, c.workers[old].output()
    assert "no broker reachable" in c.workers[old].output()
    holder = lease_holder(c.url)
    assert holder is not None and c.host_of(holder[0]) != old


def test_a_worker_with_unknown_keys_is_refused(one_shard: OneShard) -> None:
    intruder = one_shard.worker(3, keys=one_shard.net.wrong_keys, store=False)
    key = (one_shard.net.wrong_keys / "worker.key").read_text()
    public = key.split('public-key = "', 1)[1].split('"', 1)[0]
    wait_for(lambda: f"refused a cluster peer: its CurveZMQ public key {public}"
             in one_shard.broker.output(), what="the broker refusing the unknown key")
    assert intruder.popen is not None and intruder.popen.poll() is None  # still knocking
    assert f"pid {intruder.pid} registered" not in one_shard.broker.output()
    # No keys at all (plaintext): refused by the handshake itself, logged from the monitor.
    plain = one_shard.worker(3, store=False, plaintext=True, name="plain")

    def plaintext_logged() -> bool:
        return any("failed the CurveZMQ handshake on tcp://" in line and "refused by ZAP" not in line
                   for line in one_shard.broker.output().splitlines())

    try:
        wait_for(plaintext_logged, timeout=40, what="the broker logging the plaintext peer")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nbroker:\n{one_shard.broker.output()[-3000:]}\n"
                             f"plaintext worker:\n{plain.output()[-2000:]}") from None
    assert f"pid {plain.pid} registered" not in one_shard.broker.output()


@pytest.mark.parametrize("command", [
    ["zrpc-broker", "start", "--workers", "0", "--shards", "1", "--router", "tcp://0.0.0.0:{port}"],
    ["zrpc-worker", "--shard", "0", "--shards", "1", "--broker", "tcp://127.0.0.1:{port}",
     "--bus", "tcp://0.0.0.0:{port}", "--data-dir", "{home}"],
])
def test_plaintext_tcp_off_loopback_is_refused(tmp_path: Path, command: list[str]) -> None:
    argv = [str(BIN / command[0]), *(a.format(port=free_port(), home=tmp_path) for a in command[1:])]
    proc = subprocess.run(argv, env=env_for(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--cluster-keys" in proc.stderr and "--cluster-insecure" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
