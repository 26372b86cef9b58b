"""Beyond one machine: real PostgreSQL, brokers and workers as separate processes.

PostgreSQL is a real server started for the session (tests/pgserver.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import uvloop
from pgserver import PostgresServer

import zrpc
from cluster.sharding import shard_for
from procs import BrokerProc, start_broker
from zrpc.chat import ChatResponse, Message, ResponseType

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
