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

Reads and retention use a second connection (WAL readers never block the
writer).  All SQL is parameterised; text is bound as TEXT, which keeps quotes,
NUL characters and any unicode intact.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["MessageStore", "StoreConfig", "StoredMessage"]

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
"""

_INSERT_MESSAGE: Final = (
    "INSERT INTO messages (room, id, user_name, content, ts) VALUES (?, ?, ?, ?, ?)"
)
_UPSERT_LAST_ID: Final = (
    "INSERT INTO rooms (name, last_id) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET last_id = max(last_id, excluded.last_id)"
)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One chat message as stored; ``timestamp`` is in milliseconds."""

    room: str
    id: int
    user: str
    content: str
    timestamp: int


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Configuration of a :class:`MessageStore`.

    ``path`` is the SQLite file (parent directories are created).
    ``synchronous`` is the SQLite ``PRAGMA synchronous`` level: ``NORMAL``
    survives process crashes, ``FULL`` also survives power loss.
    ``retention_count`` keeps at most that many newest messages per room and
    ``retention_age_ms`` drops messages older than that, both applied by
    :meth:`MessageStore.apply_retention`.  ``max_batch`` bounds the rows of
    one group-commit transaction.
    """

    path: str
    synchronous: str = "NORMAL"
    retention_count: int | None = None
    retention_age_ms: int | None = None
    max_batch: int = 512

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

        parent = os.path.dirname(os.path.abspath(config.path))
        os.makedirs(parent, exist_ok=True)

        self._reader = _connect(config.path, config.synchronous)
        try:
            mode = self._reader.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot enable WAL mode (got {mode!r})")
            self._reader.executescript(_SCHEMA)
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
        for text in (message.room, message.user, message.content):
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
        rows = [(m.room, m.id, m.user, m.content, m.timestamp) for m, _, _ in batch]
        last: dict[str, int] = {}
        for m, _, _ in batch:
            if m.id > last.get(m.room, 0):
                last[m.room] = m.id
        error: BaseException | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT_MESSAGE, rows)
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
        self._notify(batch, error)

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
        sql = "SELECT id, user_name, content, ts FROM messages WHERE room = ? AND id > ?"
        params: list[str | int] = [room, after_id]
        if after_timestamp is not None:
            sql += " AND ts > ?"
            params.append(after_timestamp)
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        with self._read_lock:
            rows = self._reader.execute(sql, params).fetchall()
        return [StoredMessage(room, mid, user, content, ts) for mid, user, content, ts in rows]

    # -- retention ----------------------------------------------------------

    def apply_retention(self, now_ms: int) -> int:
        """Delete messages beyond ``retention_count`` per room or older than
        ``now_ms - retention_age_ms``; returns the number of rows deleted.

        ``rooms.last_id`` is untouched, so ids keep increasing after a purge.
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
