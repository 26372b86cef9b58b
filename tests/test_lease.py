"""The shard lease (workers/lease.py) against a real PostgreSQL, and the broker
registry's rule that a higher lease token supersedes the registered worker."""

from __future__ import annotations

import asyncio
import logging
import socket

import psycopg
import pytest
from pgserver import PostgresServer

from broker.registry import Refusal, WorkerRegistry
from workers.lease import LeaseConfig, ShardLease


def ready(shard: int, pid: int, lease: int | None = None) -> dict[str, object]:
    return {"shard": shard, "shards": 2, "pid": pid, **({"lease": lease} if lease else {})}


def test_registry_lets_a_higher_lease_token_supersede() -> None:
    reg = WorkerRegistry(shards=2, interval=1.0, liveness=3)
    reg.register(b"a", ready(0, 1, lease=1), now=0)
    with pytest.raises(Refusal) as refused:  # no token: refused while shard 0 is served
        reg.register(b"b", ready(0, 2), now=0)
    assert not refused.value.fatal
    with pytest.raises(Refusal):  # an older token (the fenced worker coming back)
        reg.register(b"c", ready(0, 3, lease=1), now=0)
    w = reg.register(b"d", ready(0, 4, lease=2), now=0)
    assert reg.for_shard(0) is w and b"a" not in reg.by_identity
    with pytest.raises(Refusal):
        reg.register(b"a", ready(0, 1, lease=1), now=0)
    with pytest.raises(Refusal) as bad:
        reg.register(b"e", {**ready(1, 5), "lease": "2"}, now=0)
    assert bad.value.fatal


def lease(url: str, ttl_ms: int = 600) -> ShardLease:
    return ShardLease(LeaseConfig(url, shard=0, ttl_ms=ttl_ms, renew_ms=ttl_ms // 3, poll_ms=20))


def test_one_holder_standby_takes_over_after_expiry(pg_server: PostgresServer) -> None:
    url = pg_server.new_database()

    async def main() -> None:
        stop = asyncio.Event()
        a, b = lease(url), lease(url)
        assert await a.acquire(stop) == 1
        waiting = asyncio.ensure_future(b.acquire(stop))
        keeping = asyncio.ensure_future(a.keep(stop))
        done, _ = await asyncio.wait([waiting], timeout=1.5)  # 2.5 TTLs: renewals keep it
        assert not done, "the standby took a lease that was being renewed"
        keeping.cancel()  # the holder dies: no more renewals, no release
        await asyncio.gather(keeping, return_exceptions=True)
        assert await asyncio.wait_for(waiting, 5) == 2  # expired: taken over, new token
        stop.set()
        assert await a.keep(stop) is True  # stopped at once: keep() reports no loss
        await a.close()
        await b.release()

    asyncio.run(main())


def test_keep_reports_a_takeover_and_release_hands_over_at_once(pg_server: PostgresServer) -> None:
    url = pg_server.new_database()

    async def main() -> None:
        stop = asyncio.Event()
        a = lease(url, ttl_ms=60_000)
        token = await a.acquire(stop)
        assert token == 1
        await a.release()  # expires the row now
        b = lease(url, ttl_ms=60_000)
        assert await asyncio.wait_for(b.acquire(stop), 5) == 2
        assert await asyncio.wait_for(a.keep(stop), 5) is False  # token 1 is gone
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT token FROM zrpc_leases").fetchall() == [(2,)]
        await a.close()
        await b.release()

    asyncio.run(main())


def test_a_standby_outlives_an_unreachable_database(caplog: pytest.LogCaptureFixture) -> None:
    """No database yet (connection refused): the standby keeps trying and stops cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed

    async def main() -> None:
        stop = asyncio.Event()
        standby = lease(f"postgresql://postgres@127.0.0.1:{port}/postgres")
        waiting = asyncio.ensure_future(standby.acquire(stop))
        while not any("database unreachable" in r.getMessage() for r in caplog.records):
            assert not waiting.done(), waiting
            await asyncio.sleep(0.02)  # polling the log for the standby's first attempt
        stop.set()
        assert await asyncio.wait_for(waiting, 10) is None
        await standby.close()

    with caplog.at_level(logging.WARNING, logger="zrpc.lease"):
        asyncio.run(main())
    assert not any("standing by" in r.getMessage() for r in caplog.records)
