"""Durable message history of one shard: a single SQLite file with group commit.

Role
----
A shard worker keeps the chat history of the rooms it owns in one SQLite file.
Message ids are assigned in memory (see :mod:`workers.chat.rooms`); this module
only makes them durable and serves history reads.

Durability
----------
The database runs in WAL mode.  With the default ``synchronous="NORMAL"`` a
committed transaction has been written to the WAL file (the OS page cache)
before :meth:`MessageStore.append` returns, so it survives a crash or SIGKILL
of the worker process.  It does *not* survive a power loss or kernel crash:
the last transactions may roll back.  Pass ``synchronous="FULL"`` (WAL is
fsync'ed at every commit) when power-loss durability is required; group
commit amortises that fsync over every row of the batch.

Group commit
------------
All writes go through a single background thread that owns its own
connection.  :meth:`MessageStore.append` enqueues the row and awaits a future;
the writer takes everything queued (at most ``max_batch`` rows), inserts it in
ONE transaction together with the per-room ``last_id`` bookkeeping, commits,
and then resolves every waiting future.  Rows are committed in the order they
were enqueued (so appends of one room keep their order).  If a transaction
fails, every waiter of that batch receives the exception and nothing of the
batch is stored.  A cancelled ``append`` does not withdraw its row.

Idempotency keys
----------------
A message may carry a client-chosen ``idempotency_key``. It is stored in the
message row and, in the same transaction, in the ``idempotency_keys`` table
(primary key ``(room, user_name, key)``, its own index), which keeps the id
and timestamp the message got. :meth:`MessageStore.find_key` looks a key up,
so a retried send can be answered with the first ack after any number of
restarts. Keys are kept for a window independent of the history retention:
a key is pruned only once it is older than ``key_window_ms`` **and** not
among the ``key_window_count`` newest keys of its room (so at least 24 h or
the last 100,000 keys per room by default, whichever is larger). The writer
thread prunes the rooms it wrote to at most every ``key_prune_interval_s``.

Reads and retention use a second connection (WAL readers never block the
writer).  All SQL is parameterised; text is bound as TEXT, which keeps quotes,
NUL characters and any unicode intact.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["MessageStore", "StoreConfig", "StoredMessage"]

log = logging.getLogger("zrpc.chat.store")

_SYNCHRONOUS_MODES: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
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


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One chat message as stored; ``timestamp`` is in milliseconds.

    ``idempotency_key`` is the client's key ("" when it sent none).
    """

    room: str
    id: int
    user: str
    content: str
    timestamp: int
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Configuration of a :class:`MessageStore`.

    ``path`` is the SQLite file (parent directories are created).
    ``synchronous`` is the SQLite ``PRAGMA synchronous`` level: ``NORMAL``
    survives process crashes, ``FULL`` also survives power loss.
    ``retention_count`` keeps at most that many newest messages per room and
    ``retention_age_ms`` drops messages older than that, both applied by
    :meth:`MessageStore.apply_retention`.  ``max_batch`` bounds the rows of
    one group-commit transaction. Idempotency keys are kept while younger
    than ``key_window_ms`` or among the ``key_window_count`` newest of their
    room; pruning runs at most every ``key_prune_interval_s`` seconds.
    """

    path: str
    synchronous: str = "NORMAL"
    retention_count: int | None = None
    retention_age_ms: int | None = None
    max_batch: int = 512
    key_window_ms: int = 24 * 3600 * 1000
    key_window_count: int = 100_000
    key_prune_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.path or self.path == ":memory:" or self.path.startswith("file:"):
            raise ValueError("StoreConfig.path must be a plain file path")
        if self.synchronous.upper() not in _SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous must be one of {sorted(_SYNCHRONOUS_MODES)}, got {self.synchronous!r}"
            )
        if self.retention_count is not None and self.retention_count < 0:
            raise ValueError("retention_count must be >= 0")
        if self.retention_age_ms is not None and self.retention_age_ms < 0:
            raise ValueError("retention_age_ms must be >= 0")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.key_window_ms < 0 or self.key_window_count < 0 or self.key_prune_interval_s < 0:
            raise ValueError("key_window_ms, key_window_count and key_prune_interval_s "
                             "must be >= 0")


# One queued append: the row, and the loop/future to resolve once it is committed.
_Pending = tuple[StoredMessage, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class _Stop:
    """Queue sentinel asking the writer thread to finish."""


_STOP: Final = _Stop()


def _resolve(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    """Complete waiting futures (runs on their event loop)."""
    for fut in futures:
        if fut.done():  # the waiter was cancelled
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


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


class MessageStore:
    """Durable history of one shard (see the module docstring).

    ``commits`` counts committed write transactions and ``committed_rows`` the
    rows they held; ``largest_batch`` is the biggest transaction so far.
    """

    def __init__(self, config: StoreConfig) -> None:
        self.config: Final = config
        self.commits = 0
        self.committed_rows = 0
        self.largest_batch = 0
        self._closed = False
        self._queue: queue.SimpleQueue[_Pending | _Stop] = queue.SimpleQueue()
        self._read_lock = threading.Lock()
        self._key_rooms: set[str] = set()  # rooms given keys since the last prune (writer)
        self._pruned_at = time.monotonic()

        parent = os.path.dirname(os.path.abspath(config.path))
        os.makedirs(parent, exist_ok=True)

        self._reader = _connect(config.path, config.synchronous)
        try:
            mode = self._reader.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot enable WAL mode (got {mode!r})")
            self._reader.executescript(_SCHEMA)
            columns = {row[1] for row in self._reader.execute("PRAGMA table_info(messages)")}
            if "idem_key" not in columns:
                self._reader.execute(_ADD_KEY_COLUMN)
            self._writer_conn = _connect(config.path, config.synchronous)
        except BaseException:
            self._reader.close()
            raise
        self._thread = threading.Thread(
            target=self._writer_main, name=f"chat-store-writer:{config.path}", daemon=True
        )
        self._thread.start()

    # -- writes -------------------------------------------------------------

    async def append(self, message: StoredMessage) -> None:
        """Store ``message``; returns once the transaction holding it committed.

        Raises the commit's exception if the batch failed, ``ValueError`` for
        text that cannot be encoded as UTF-8 (lone surrogates) and
        ``RuntimeError`` once the store is closed.
        """
        await self.append_nowait(message)

    def append_nowait(self, message: StoredMessage) -> asyncio.Future[None]:
        """Queue ``message`` now; the returned future completes once it is committed.

        Rows are committed in the order of the calls (so a caller that assigns
        ids and queues in one synchronous step keeps id order). The future
        fails like :meth:`append`; ``ValueError`` and ``RuntimeError`` are
        raised right away. Cancelling the future does not withdraw the row.
        """
        if self._closed:
            raise RuntimeError("MessageStore is closed")
        for text in (message.room, message.user, message.content, message.idempotency_key):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                # Rejected here so that one bad row cannot fail a whole batch.
                raise ValueError(f"message text is not valid unicode: {exc}") from None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.put((message, loop, fut))
        return fut

    def _writer_main(self) -> None:
        conn = self._writer_conn
        stop = False
        try:
            while not stop:
                first = self._queue.get()
                if isinstance(first, _Stop):
                    break
                batch: list[_Pending] = [first]
                while len(batch) < self.config.max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, _Stop):
                        stop = True
                        break
                    batch.append(item)
                self._commit_batch(conn, batch)
        finally:
            conn.close()
            self._fail_leftovers()

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Pending]) -> None:
        rows = [(m.room, m.id, m.user, m.content, m.timestamp, m.idempotency_key or None)
                for m, _, _ in batch]
        keys = [(m.room, m.user, m.idempotency_key, m.id, m.timestamp)
                for m, _, _ in batch if m.idempotency_key]
        last: dict[str, int] = {}
        for m, _, _ in batch:
            if m.id > last.get(m.room, 0):
                last[m.room] = m.id
        error: BaseException | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT_MESSAGE, rows)
                if keys:
                    conn.executemany(_INSERT_KEY, keys)
                conn.executemany(_UPSERT_LAST_ID, last.items())
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:
            error = exc
        else:
            self.commits += 1
            self.committed_rows += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            self._key_rooms.update(k[0] for k in keys)
        self._notify(batch, error)
        if self._key_rooms and (time.monotonic() - self._pruned_at
                                >= self.config.key_prune_interval_s):
            self._prune_keys(conn, self._key_rooms, int(time.time() * 1000))
            self._key_rooms = set()
            self._pruned_at = time.monotonic()

    def _prune_keys(self, conn: sqlite3.Connection, rooms: Iterable[str], now_ms: int) -> int:
        """Delete the keys of ``rooms`` that left the window; returns how many."""
        cutoff = now_ms - self.config.key_window_ms
        keep = self.config.key_window_count
        deleted = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for room in rooms:
                    deleted += conn.execute(_PRUNE_KEYS, (room, cutoff, room, keep)).rowcount
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:  # pruning is housekeeping: the next round retries
            log.warning("pruning idempotency keys failed: %s", exc)
            return 0
        return deleted

    @staticmethod
    def _notify(batch: Iterable[_Pending], error: BaseException | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, loop, fut in batch:
            by_loop.setdefault(loop, []).append(fut)
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, futures, error)
            except RuntimeError:  # that event loop is closed: nobody is waiting
                pass

    def _fail_leftovers(self) -> None:
        leftovers: list[_Pending] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, _Stop):
                leftovers.append(item)
        if leftovers:
            self._notify(leftovers, RuntimeError("MessageStore is closed"))

    # -- reads --------------------------------------------------------------

    def find_key(self, room: str, user: str, key: str) -> tuple[int, int] | None:
        """``(id, timestamp)`` of the committed message ``user`` sent to ``room``
        with idempotency ``key``, or None (never stored, or out of the window)."""
        with self._read_lock:
            row = self._reader.execute(_FIND_KEY, (room, user, key)).fetchone()
        return None if row is None else (row[0], row[1])

    def last_ids(self) -> dict[str, int]:
        """Room -> highest message id ever committed (retention does not lower it)."""
        with self._read_lock:
            rows = self._reader.execute("SELECT name, last_id FROM rooms").fetchall()
        return {name: last_id for name, last_id in rows}

    def read(
        self,
        room: str,
        *,
        after_id: int = 0,
        after_timestamp: int | None = None,
        limit: int = 1000,
    ) -> list[StoredMessage]:
        """Committed messages of ``room`` with ``id > after_id`` (and, if given,
        ``timestamp > after_timestamp``), ascending by id, at most ``limit``."""
        if limit < 0:
            raise ValueError("limit must be >= 0")
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
        """Delete messages beyond ``retention_count`` per room or older than
        ``now_ms - retention_age_ms``; returns the number of rows deleted.

        ``rooms.last_id`` is untouched, so ids keep increasing after a purge.
        Idempotency keys have their own window (see :meth:`prune_keys`).
        """
        count = self.config.retention_count
        age = self.config.retention_age_ms
        if count is None and age is None:
            return 0
        deleted = 0
        with self._read_lock:
            conn = self._reader
            conn.execute("BEGIN IMMEDIATE")
            try:
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
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return deleted

    def prune_keys(self, now_ms: int) -> int:
        """Delete the idempotency keys of every room that left the window
        (see :class:`StoreConfig`); returns how many. The writer thread also
        does this on its own for the rooms it writes to."""
        with self._read_lock:
            rooms = [r for (r,) in self._reader.execute(
                "SELECT DISTINCT room FROM idempotency_keys").fetchall()]
            return self._prune_keys(self._reader, rooms, now_ms)

    # -- lifecycle ----------------------------------------------------------

    async def close(self) -> None:
        """Commit everything already appended, stop the writer, close connections."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        with self._read_lock:
            self._reader.close()
