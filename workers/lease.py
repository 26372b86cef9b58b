"""The shard lease: which of several workers serves a shard, with a fencing token.

Role
----
With a shared store (PostgreSQL) several workers may be started for one
shard, on different hosts. Exactly one of them holds the shard's lease, a
row of ``zrpc_leases`` (shard, holder, token, expires_at); the others are
standbys: they poll, and register with the brokers only once they hold it.

- **Acquire**: one statement takes the row if it is free or expired, and
  increments ``token`` (the fencing token). Expiry is judged by the database
  clock alone (``now()``), so hosts' clocks do not matter.
- **Keep**: the holder renews every ``renew_ms`` (``expires_at = now() + ttl``,
  only while its token is current). If it cannot renew before its own
  conservative deadline (the time it sent its last successful renewal plus
  ``ttl``), it must stop serving: :meth:`ShardLease.keep` returns and the
  worker exits. A standby then finds the row expired and takes over.
- **Fencing**: the store writes only while the row still holds the writer's
  token (:mod:`workers.chat.store_pg`), so a worker that was partitioned and
  comes back cannot write, even before it notices it lost the lease.
- **Release**: a clean shutdown expires the row at once, so a standby takes
  over without waiting for the TTL.

Takeover time after the holder dies: at most ``ttl + poll_ms`` plus the
standby's start (load room state, register with the brokers). The worker
uses ``ttl = liveness x heartbeat`` and polls every ``heartbeat / 4``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import psycopg

from workers.chat.store_pg import CONNECT_OPTIONS, ensure_schema

__all__ = ["LeaseConfig", "ShardLease"]

log = logging.getLogger("zrpc.lease")

_ACQUIRE = """
INSERT INTO zrpc_leases (shard, holder, token, expires_at)
VALUES (%(shard)s, %(holder)s, 1, now() + %(ttl)s * interval '1 millisecond')
ON CONFLICT (shard) DO UPDATE
    SET holder = excluded.holder, token = zrpc_leases.token + 1, expires_at = excluded.expires_at
    WHERE zrpc_leases.expires_at <= now()
RETURNING token"""
_RENEW = """
UPDATE zrpc_leases SET expires_at = now() + %(ttl)s * interval '1 millisecond'
WHERE shard = %(shard)s AND token = %(token)s AND expires_at > now()
RETURNING token"""
_RELEASE = """
UPDATE zrpc_leases SET expires_at = now() - interval '1 millisecond'
WHERE shard = %(shard)s AND token = %(token)s"""


@dataclass(frozen=True)
class LeaseConfig:
    """``url``: the shared PostgreSQL store; ``ttl_ms`` how long a lease lasts
    unrenewed; ``renew_ms`` the holder's renewal period; ``poll_ms`` the
    standbys' period."""

    url: str
    shard: int
    ttl_ms: int
    renew_ms: int
    poll_ms: int

    def __post_init__(self) -> None:
        if not 0 < self.renew_ms < self.ttl_ms:
            raise ValueError("lease: renew_ms must be > 0 and < ttl_ms")
        if self.poll_ms <= 0:
            raise ValueError("lease: poll_ms must be > 0")


def _ensure_schema(url: str) -> None:
    with psycopg.connect(url, autocommit=True, **CONNECT_OPTIONS) as conn:
        ensure_schema(conn)


class ShardLease:
    """One worker's view of its shard's lease (see the module docstring)."""

    def __init__(self, config: LeaseConfig) -> None:
        self.config = config
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.token: int | None = None
        self._sent = 0.0  # loop time the last successful acquire/renewal was sent
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._abandoned: list[asyncio.Future[list[Any]]] = []  # renewals left unanswered

    def _params(self) -> dict[str, Any]:
        c = self.config
        return {"shard": c.shard, "holder": self.holder, "ttl": c.ttl_ms, "token": self.token}

    async def _execute(self, sql: str) -> list[Any]:
        """One statement; a broken connection is dropped (re-opened by the next call)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(
                self.config.url, autocommit=True, **CONNECT_OPTIONS)
        try:
            cur = await self._conn.execute(sql, self._params())
            return await cur.fetchall() if cur.description else []
        except (psycopg.OperationalError, asyncio.CancelledError):
            await self.close()  # a half-done exchange leaves the connection unusable
            raise

    async def acquire(self, stop: asyncio.Event) -> int | None:
        """Wait as a standby until this worker holds the lease; its token (None if stopped)."""
        c = self.config
        waiting_logged = schema = False
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            sent = loop.time()
            try:
                if not schema:
                    await asyncio.to_thread(_ensure_schema, c.url)
                    schema = True
                rows: list[Any] | None = await self._execute(_ACQUIRE)
            except psycopg.OperationalError as exc:  # keep trying: the database may come back
                log.warning("lease of shard %d: database unreachable (%s)", c.shard,
                            str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
                rows = None
            if rows:
                self.token = int(rows[0][0])
                self._sent = sent
                log.info("holding the lease of shard %d (fencing token %d)", c.shard, self.token)
                return self.token
            if rows is not None and not waiting_logged:
                log.info("shard %d is served by another worker: standing by", c.shard)
                waiting_logged = True
            try:
                await asyncio.wait_for(stop.wait(), c.poll_ms / 1000)
            except TimeoutError:
                pass
        return None

    async def keep(self, stop: asyncio.Event) -> bool:
        """Renew until ``stop`` (True) or until the lease is lost (False)."""
        c = self.config
        loop = asyncio.get_running_loop()
        valid_until = self._sent + c.ttl_ms / 1000  # conservative: the database's clock started later
        while not stop.is_set():
            sent = loop.time()
            renewal = asyncio.ensure_future(self._execute(_RENEW))
            await asyncio.wait([renewal], timeout=max(0.0, valid_until - sent))
            rows: list[Any] | None = None
            if not renewal.done():
                # Not answered in time (a cut link): give up on it without waiting for the
                # cancellation, which libpq would try over the same cut link.
                self._abandoned.append(renewal)
                self._conn = None
                log.warning("lease of shard %d: renewal unanswered", c.shard)
            elif renewal.exception() is not None:
                log.warning("lease of shard %d: renewal failed (%s)", c.shard, renewal.exception())
            else:
                rows = renewal.result()
            if rows == []:
                log.error("lease of shard %d (token %s) was taken over: stopping", c.shard, self.token)
                return False
            if rows:
                valid_until = sent + c.ttl_ms / 1000
            if loop.time() >= valid_until:
                log.error("lease of shard %d (token %s) was not renewed within its %d ms: stopping",
                          c.shard, self.token, c.ttl_ms)
                return False
            wait = min(c.renew_ms / 1000, max(0.0, valid_until - loop.time()))
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass
        return True

    async def release(self) -> None:
        """Expire the lease now (clean shutdown) so that a standby takes over at once."""
        if self.token is not None:
            try:
                await asyncio.wait_for(self._execute(_RELEASE), 2)
            except (psycopg.OperationalError, TimeoutError) as exc:
                log.warning("lease of shard %d: release failed (%s); it expires by itself",
                            self.config.shard, exc)
        await self.close()

    async def close(self) -> None:
        """Close the lease's connection (the lease itself is left to expire)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        for renewal in self._abandoned:
            renewal.cancel()
