"""The shared history backend: PostgreSQL through psycopg 3.

Role
----
With ``--store postgresql://...`` every worker keeps its shard's history in
one PostgreSQL database, so a standby worker on another host can take a
shard over (:mod:`workers.lease`) and PostgreSQL's own streaming replication
protects the data.  Same guarantees as the SQLite backend: a message is
acked only after the transaction holding it committed (with the server's
default ``synchronous_commit = on``, after its WAL record is flushed), one
transaction per group-commit batch, ``(room, id)`` is the primary key.

Why psycopg 3
-------------
psycopg 3 is the maintained successor of psycopg2, built on libpq (so every
libpq connection option and ``PG*`` environment variable works, including
TCP keepalives and ``target_session_attrs`` for fail-over), and has both a
blocking and an asyncio API.  The group-commit writer is a thread (shared
with the SQLite backend) and uses the blocking API; the lease keeper runs on
the event loop with the asyncio API.  asyncpg is asyncio-only and speaks its
own protocol implementation, so it would need a second writer design.

One statement per batch
-----------------------
A batch is written by one statement in autocommit mode, one round trip:
the rows travel as arrays (``unnest``), the ``zrpc_rooms.last_id``
bookkeeping is a data-modifying CTE, and for a fenced store the insert
happens only while ``zrpc_leases`` still holds this worker's token (the
lease row is read ``FOR SHARE``, so a takeover waits for the write, and a
write after a takeover stores nothing and raises
:class:`~workers.chat.store.FencedError`).

Text is stored as UTF-8 ``BYTEA``: PostgreSQL's ``TEXT`` cannot hold NUL
characters, which chat content and names may contain.

A lost connection is re-opened with backoff for up to ``commit_timeout_ms``;
a batch whose commit outcome is unknown is looked up before it is written
again, so it is neither lost nor stored twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

import psycopg

from workers.chat.store import FencedError, MessageStore, StoreConfig, StoredMessage

__all__ = ["CONNECT_OPTIONS", "PostgresStore", "connect", "ensure_schema"]

log = logging.getLogger("zrpc.store")
T = TypeVar("T")

_SCHEMA_LOCK: Final = 0x7A727063  # pg_advisory_xact_lock key serialising CREATE TABLE
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS zrpc_rooms (
        name    BYTEA  PRIMARY KEY,
        last_id BIGINT NOT NULL,
        last_ts BIGINT NOT NULL DEFAULT 0)""",
    "ALTER TABLE zrpc_rooms ADD COLUMN IF NOT EXISTS last_ts BIGINT NOT NULL DEFAULT 0",
    """CREATE TABLE IF NOT EXISTS zrpc_messages (
        room      BYTEA  NOT NULL,
        id        BIGINT NOT NULL,
        user_name BYTEA  NOT NULL,
        content   BYTEA  NOT NULL,
        ts        BIGINT NOT NULL,
        idem_key  BYTEA,
        PRIMARY KEY (room, id))""",
    "CREATE INDEX IF NOT EXISTS zrpc_messages_room_ts ON zrpc_messages (room, ts)",
    """CREATE TABLE IF NOT EXISTS zrpc_idempotency_keys (
        room      BYTEA  NOT NULL,
        user_name BYTEA  NOT NULL,
        key       BYTEA  NOT NULL,
        id        BIGINT NOT NULL,
        ts        BIGINT NOT NULL,
        PRIMARY KEY (room, user_name, key))""",
    "CREATE INDEX IF NOT EXISTS zrpc_idempotency_keys_room_id ON zrpc_idempotency_keys (room, id)",
    """CREATE TABLE IF NOT EXISTS zrpc_leases (
        shard      INTEGER     PRIMARY KEY,
        holder     TEXT        NOT NULL,
        token      BIGINT      NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL)""",
)

_ROWS: Final = ("unnest(%s::bytea[], %s::bigint[], %s::bytea[], %s::bytea[], %s::bigint[], "
                "%s::bytea[])")
_WRITE: Final = f"""
WITH ins AS (
    INSERT INTO zrpc_messages (room, id, user_name, content, ts, idem_key)
    SELECT * FROM {_ROWS} {{fence}}
    RETURNING room, id, user_name, ts, idem_key),
keys AS (
    INSERT INTO zrpc_idempotency_keys (room, user_name, key, id, ts)
    SELECT room, user_name, idem_key, id, ts FROM ins WHERE idem_key IS NOT NULL)
INSERT INTO zrpc_rooms (name, last_id, last_ts)
SELECT room, max(id), max(ts) FROM ins GROUP BY room
ON CONFLICT (name) DO UPDATE SET last_id = GREATEST(zrpc_rooms.last_id, excluded.last_id),
                                 last_ts = GREATEST(zrpc_rooms.last_ts, excluded.last_ts)
RETURNING name"""
# Keys of ``room`` older than the cutoff and not among its newest N (index room, id).
_PRUNE_KEYS: Final = (
    "DELETE FROM zrpc_idempotency_keys WHERE room = %s AND ts < %s AND id <= ("
    " SELECT id FROM zrpc_idempotency_keys WHERE room = %s ORDER BY id DESC LIMIT 1 OFFSET %s)")
_FENCE: Final = ("WHERE EXISTS (SELECT 1 FROM zrpc_leases WHERE shard = %s AND token = %s "
                 "AND expires_at > now() FOR SHARE)")

# libpq options: fail a dead link in seconds, not after the kernel's two hours.
CONNECT_OPTIONS: Final[dict[str, Any]] = {
    "connect_timeout": 3, "keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1,
    "keepalives_count": 3, "tcp_user_timeout": 5000, "application_name": "zrpc-worker",
}


def connect(url: str) -> psycopg.Connection[Any]:
    """An autocommit connection to ``url`` with short TCP failure detection."""
    return psycopg.connect(url, autocommit=True, **CONNECT_OPTIONS)


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the tables if missing (serialised: workers may start together)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for stmt in _SCHEMA:
            conn.execute(stmt)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8")


class PostgresStore(MessageStore):
    """A shard's history in a shared PostgreSQL database (see the module docstring)."""

    def __init__(self, config: StoreConfig) -> None:
        super().__init__(config)
        self._reader = connect(config.url)
        try:
            ensure_schema(self._reader)
            self._start_writer()
        except BaseException:
            self._reader.close()
            raise
        self._last_ts: dict[str, int] = {}  # room -> newest stored timestamp (last_ids())
        fence = "" if config.fence is None else _FENCE
        self._sql = _WRITE.format(fence=fence)

    def _open_writer(self) -> psycopg.Connection[Any]:
        return connect(self.config.url)

    def _params(self, batch: Sequence[StoredMessage]) -> list[Any]:
        params: list[Any] = [
            [_bytes(m.room) for m in batch], [m.id for m in batch],
            [_bytes(m.user) for m in batch], [_bytes(m.content) for m in batch],
            [m.timestamp for m in batch],
            [_bytes(m.idempotency_key) if m.idempotency_key else None for m in batch],
        ]
        if self.config.fence is not None:
            params.extend(self.config.fence)
        return params

    def _write(self, conn: psycopg.Connection[Any],
               batch: Sequence[StoredMessage]) -> psycopg.Connection[Any]:
        deadline = time.monotonic() + self.config.commit_timeout_ms / 1000
        unknown = False  # a previous attempt may have committed
        delay = 0.05
        while True:
            try:
                if conn.closed:
                    conn = self._open_writer()
                if unknown and self._stored(conn, batch[0]):
                    return conn
                rows = conn.execute(self._sql, self._params(batch)).fetchall()
            except psycopg.OperationalError as exc:
                if not conn.closed and not conn.broken:
                    raise  # a failed statement, not a lost link
                unknown = True
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("PostgreSQL link lost (%s); retrying the batch", exc)
                time.sleep(delay)  # the writer thread's reconnect backoff
                delay = min(delay * 2, 1.0)
                continue
            if not rows:
                shard, token = self.config.fence or (-1, -1)
                raise FencedError(f"shard {shard}: lease token {token} is no longer held; "
                                  "another worker took this shard over")
            last_ts = self._last_ts
            for m in batch:  # keep last_timestamp() exact for rooms written since last_ids()
                if m.timestamp > last_ts.get(m.room, 0):
                    last_ts[m.room] = m.timestamp
            return conn

    @staticmethod
    def _stored(conn: psycopg.Connection[Any], first: StoredMessage) -> bool:
        """Whether a batch (all or nothing) starting with ``first`` was committed."""
        row = conn.execute("SELECT 1 FROM zrpc_messages WHERE room = %s AND id = %s",
                           (_bytes(first.room), first.id)).fetchone()
        return row is not None

    def _close_writer(self, conn: psycopg.Connection[Any]) -> None:
        conn.close()

    def _prune_keys(self, conn: psycopg.Connection[Any], rooms: Iterable[str], now_ms: int) -> int:
        cutoff = now_ms - self.config.key_window_ms
        keep = self.config.key_window_count
        deleted = 0
        with conn.transaction():
            for room in rooms:
                name = _bytes(room)
                deleted += conn.execute(_PRUNE_KEYS, (name, cutoff, name, keep)).rowcount
        return deleted

    def find_key(self, room: str, user: str, key: str) -> tuple[int, int] | None:
        row = self._on_reader(lambda c: c.execute(
            "SELECT id, ts FROM zrpc_idempotency_keys WHERE room = %s AND user_name = %s"
            " AND key = %s", (_bytes(room), _bytes(user), _bytes(key))).fetchone())
        return None if row is None else (row[0], row[1])

    async def find_key_async(self, room: str, user: str, key: str) -> tuple[int, int] | None:
        return await asyncio.to_thread(self.find_key, room, user, key)

    def prune_keys(self, now_ms: int) -> int:
        def prune(conn: psycopg.Connection[Any]) -> int:
            rooms = [bytes(r).decode("utf-8") for (r,) in conn.execute(
                "SELECT DISTINCT room FROM zrpc_idempotency_keys").fetchall()]
            return self._prune_keys(conn, rooms, now_ms)

        return self._on_reader(prune)

    def _close_reader(self) -> None:
        self._reader.close()

    def _on_reader(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``fn`` on the reader connection, re-opening it once if the link was lost."""
        with self._read_lock:
            if self._reader.closed or self._reader.broken:
                self._reader = connect(self.config.url)
            try:
                return fn(self._reader)
            except psycopg.OperationalError:
                if not self._reader.broken:
                    raise
                self._reader = connect(self.config.url)
                return fn(self._reader)

    # -- reads --------------------------------------------------------------

    def last_ids(self) -> dict[str, int]:
        rows = self._on_reader(
            lambda c: c.execute("SELECT name, last_id, last_ts FROM zrpc_rooms").fetchall())
        for name, _, last_ts in rows:
            room = bytes(name).decode("utf-8")
            if last_ts > self._last_ts.get(room, 0):
                self._last_ts[room] = last_ts
        return {bytes(name).decode("utf-8"): last_id for name, last_id, _ in rows}

    def last_timestamp(self, room: str, last_id: int) -> int:
        # From the snapshot last_ids() took (no round trip on the event loop); rooms created
        # after it have no earlier history in this store.
        return self._last_ts.get(room, 0)

    def _read(self, room: str, after_id: int, after_timestamp: int | None,
              limit: int) -> list[StoredMessage]:
        sql = ("SELECT id, user_name, content, ts, idem_key FROM zrpc_messages"
               " WHERE room = %s AND id > %s")
        params: list[Any] = [_bytes(room), after_id]
        if after_timestamp is not None:
            sql += " AND ts > %s"
            params.append(after_timestamp)
        sql += " ORDER BY id LIMIT %s"
        params.append(limit)
        rows = self._on_reader(lambda c: c.execute(sql, params).fetchall())
        return [StoredMessage(room, mid, bytes(user).decode("utf-8"),
                              bytes(content).decode("utf-8"), ts,
                              bytes(key).decode("utf-8") if key is not None else "")
                for mid, user, content, ts, key in rows]

    # -- retention ----------------------------------------------------------

    def apply_retention(self, now_ms: int) -> int:
        count = self.config.retention_count
        age = self.config.retention_age_ms

        def purge(conn: psycopg.Connection[Any]) -> int:
            deleted = 0
            with conn.transaction():
                if age is not None:
                    deleted += conn.execute("DELETE FROM zrpc_messages WHERE ts < %s",
                                            (now_ms - age,)).rowcount
                if count is not None:
                    deleted += conn.execute(
                        "DELETE FROM zrpc_messages m USING ("
                        " SELECT room, id, row_number() OVER (PARTITION BY room ORDER BY id DESC)"
                        " AS newer FROM zrpc_messages) d"
                        " WHERE m.room = d.room AND m.id = d.id AND d.newer > %s",
                        (count,)).rowcount
            return deleted

        if count is None and age is None:
            return 0
        return self._on_reader(purge)

