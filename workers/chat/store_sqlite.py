"""The embedded history backend: one SQLite file per shard (the default store).

Durability
----------
The database runs in WAL mode.  With the default ``synchronous="NORMAL"`` a
committed transaction has been written to the WAL file (the OS page cache)
before :meth:`~workers.chat.store.MessageStore.append` returns, so it
survives a crash or SIGKILL of the worker process.  It does *not* survive a
power loss or kernel crash: the last transactions may roll back.  Pass
``synchronous="FULL"`` (WAL is fsync'ed at every commit) when power-loss
durability is required; group commit amortises that fsync over every row of
the batch.

The writer thread owns one connection; reads and retention use a second one
(WAL readers never block the writer).  All SQL is parameterised; text is
bound as TEXT, which keeps quotes, NUL characters and any unicode intact.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from workers.chat.store import MessageStore, StoreConfig, StoredMessage, last_ids_of

__all__ = ["SqliteStore"]

_BUSY_TIMEOUT_MS: Final = 5000

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS rooms (
    name    TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    room      TEXT    NOT NULL,
    id        INTEGER NOT NULL,
    user_name TEXT    NOT NULL,
    content   TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    PRIMARY KEY (room, id)
);
CREATE INDEX IF NOT EXISTS messages_room_ts ON messages (room, ts);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    room      TEXT    NOT NULL,
    user_name TEXT    NOT NULL,
    key       TEXT    NOT NULL,
    id        INTEGER NOT NULL,
    ts        INTEGER NOT NULL,
    PRIMARY KEY (room, user_name, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_room_id ON idempotency_keys (room, id);
"""

# Databases created before idempotency keys lack this column (NULL: no key).
_ADD_KEY_COLUMN: Final = "ALTER TABLE messages ADD COLUMN idem_key TEXT"

_INSERT_MESSAGE: Final = (
    "INSERT INTO messages (room, id, user_name, content, ts, idem_key) VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_KEY: Final = (
    "INSERT INTO idempotency_keys (room, user_name, key, id, ts) VALUES (?, ?, ?, ?, ?)"
)
_FIND_KEY: Final = (
    "SELECT id, ts FROM idempotency_keys WHERE room = ? AND user_name = ? AND key = ?"
)
# Keys of ``room`` older than the cutoff and not among its newest N (index room, id).
_PRUNE_KEYS: Final = (
    "DELETE FROM idempotency_keys WHERE room = ? AND ts < ? AND id <= ("
    " SELECT id FROM idempotency_keys WHERE room = ? ORDER BY id DESC LIMIT 1 OFFSET ?)"
)
_UPSERT_LAST_ID: Final = (
    "INSERT INTO rooms (name, last_id) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET last_id = max(last_id, excluded.last_id)"
)


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_MS / 1000
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS:d}")
        # ``synchronous`` is validated against a whitelist; PRAGMAs cannot be bound.
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteStore(MessageStore):
    """A shard's history in one SQLite file (see the module docstring)."""

    def __init__(self, config: StoreConfig) -> None:
        super().__init__(config)
        path = config.path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._reader = _connect(path, config.synchronous)
        try:
            mode = self._reader.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot enable WAL mode (got {mode!r})")
            self._reader.executescript(_SCHEMA)
            columns = {row[1] for row in self._reader.execute("PRAGMA table_info(messages)")}
            if "idem_key" not in columns:
                self._reader.execute(_ADD_KEY_COLUMN)
            self._start_writer()
        except BaseException:
            self._reader.close()
            raise

    def _open_writer(self) -> sqlite3.Connection:
        return _connect(self.config.path, self.config.synchronous)

    def _write(self, conn: sqlite3.Connection, batch: Sequence[StoredMessage]) -> sqlite3.Connection:
        rows = [(m.room, m.id, m.user, m.content, m.timestamp, m.idempotency_key or None)
                for m in batch]
        keys = [(m.room, m.user, m.idempotency_key, m.id, m.timestamp)
                for m in batch if m.idempotency_key]
        with _immediate(conn):
            conn.executemany(_INSERT_MESSAGE, rows)
            if keys:
                conn.executemany(_INSERT_KEY, keys)
            conn.executemany(_UPSERT_LAST_ID, last_ids_of(batch).items())
        return conn

    def _close_writer(self, conn: sqlite3.Connection) -> None:
        conn.close()

    def _prune_keys(self, conn: sqlite3.Connection, rooms: Iterable[str], now_ms: int) -> int:
        cutoff = now_ms - self.config.key_window_ms
        keep = self.config.key_window_count
        deleted = 0
        with _immediate(conn):
            for room in rooms:
                deleted += conn.execute(_PRUNE_KEYS, (room, cutoff, room, keep)).rowcount
        return deleted

    def _close_reader(self) -> None:
        self._reader.close()

    # -- reads --------------------------------------------------------------

    def find_key(self, room: str, user: str, key: str) -> tuple[int, int] | None:
        with self._read_lock:
            row = self._reader.execute(_FIND_KEY, (room, user, key)).fetchone()
        return None if row is None else (row[0], row[1])

    def prune_keys(self, now_ms: int) -> int:
        with self._read_lock:
            rooms = [r for (r,) in self._reader.execute(
                "SELECT DISTINCT room FROM idempotency_keys").fetchall()]
            return self._prune_keys(self._reader, rooms, now_ms)

    def last_ids(self) -> dict[str, int]:
        with self._read_lock:
            rows = self._reader.execute("SELECT name, last_id FROM rooms").fetchall()
        return {name: last_id for name, last_id in rows}

    def _read(self, room: str, after_id: int, after_timestamp: int | None,
              limit: int) -> list[StoredMessage]:
        sql = ("SELECT id, user_name, content, ts, idem_key FROM messages"
               " WHERE room = ? AND id > ?")
        params: list[str | int] = [room, after_id]
        if after_timestamp is not None:
            sql += " AND ts > ?"
            params.append(after_timestamp)
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        with self._read_lock:
            rows = self._reader.execute(sql, params).fetchall()
        return [StoredMessage(room, mid, user, content, ts, key or "")
                for mid, user, content, ts, key in rows]

    # -- retention ----------------------------------------------------------

    def apply_retention(self, now_ms: int) -> int:
        count = self.config.retention_count
        age = self.config.retention_age_ms
        if count is None and age is None:
            return 0
        deleted = 0
        with self._read_lock, _immediate(self._reader) as conn:
            rooms = [r for (r,) in conn.execute("SELECT name FROM rooms").fetchall()]
            for room in rooms:
                if age is not None:
                    cur = conn.execute(
                        "DELETE FROM messages WHERE room = ? AND ts < ?", (room, now_ms - age)
                    )
                    deleted += cur.rowcount
                if count is not None:
                    cur = conn.execute(
                        "DELETE FROM messages WHERE room = ? AND id <= ("
                        " SELECT id FROM messages WHERE room = ?"
                        " ORDER BY id DESC LIMIT 1 OFFSET ?)",
                        (room, room, count),
                    )
                    deleted += cur.rowcount
        return deleted
