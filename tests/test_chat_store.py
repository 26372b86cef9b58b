"""The store suite: group commit, history reads, retention, durability.

Every test runs against both backends (an embedded SQLite file and a real
PostgreSQL server started for the session), through the one
:class:`~workers.chat.store.MessageStore` interface.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from pgserver import PostgresServer

from workers.chat.store import FencedError, MessageStore, StoreConfig, StoredMessage, open_store

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]


class Backend:
    """One store backend under test: a fresh store URL plus ways to provoke it."""

    name: str
    url: str
    integrity_error: type[Exception]

    def lock_writes(self) -> Any:
        """Block the writer's next transaction until ``release()`` (so appends queue up)."""
        raise NotImplementedError

    def refuse_inserts(self) -> None:
        """Make every insert into the messages table fail with 'refused by trigger'."""
        raise NotImplementedError

    def allow_inserts(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SqliteBackend(Backend):
    name = "sqlite"
    integrity_error = sqlite3.IntegrityError

    def __init__(self, tmp: Path) -> None:
        self.path = str(tmp / "nested" / "dir" / "shard.db")
        self.url = f"sqlite://{self.path}"
        self._admin: sqlite3.Connection | None = None

    def lock_writes(self) -> Any:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")  # SQLite's write lock

        class Lock:
            def release(self) -> None:
                conn.execute("ROLLBACK")
                conn.close()

        return Lock()

    def refuse_inserts(self) -> None:
        self._admin = sqlite3.connect(self.path, isolation_level=None)
        self._admin.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON messages "
            "BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END")

    def allow_inserts(self) -> None:
        assert self._admin is not None
        self._admin.execute("DROP TRIGGER refuse")
        self._admin.close()


class PostgresBackend(Backend):
    name = "postgresql"
    integrity_error = psycopg.errors.UniqueViolation

    def __init__(self, server: PostgresServer) -> None:
        self.url = server.new_database()
        self._admin = psycopg.connect(self.url, autocommit=True)

    def lock_writes(self) -> Any:
        conn = psycopg.connect(self.url, autocommit=True)
        conn.execute("BEGIN")
        conn.execute("LOCK TABLE zrpc_messages IN EXCLUSIVE MODE")  # readers pass, inserts wait

        class Lock:
            def release(self) -> None:
                conn.execute("COMMIT")
                conn.close()

        return Lock()

    def refuse_inserts(self) -> None:
        self._admin.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused by trigger'; END $$")
        self._admin.execute("CREATE TRIGGER refuse BEFORE INSERT ON zrpc_messages "
                            "FOR EACH ROW EXECUTE FUNCTION refuse()")

    def allow_inserts(self) -> None:
        self._admin.execute("DROP TRIGGER refuse ON zrpc_messages")

    def close(self) -> None:
        self._admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    b: Backend
    if request.param == "sqlite":
        b = SqliteBackend(tmp_path)
    else:
        b = PostgresBackend(request.getfixturevalue("pg_server"))
    try:
        yield b
    finally:
        b.close()


def run_with_store(config: StoreConfig, body: Callable[[MessageStore], Awaitable[T]]) -> T:
    """Open a store, run ``body`` in a fresh event loop, always close the store."""

    async def main() -> T:
        store = open_store(config)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def msg(
    room: str, mid: int, ts: int = 0, user: str = "u", content: str | None = None
) -> StoredMessage:
    return StoredMessage(room, mid, user, f"m{mid}" if content is None else content, ts)


async def let_tasks_enqueue() -> None:
    """Let every task created so far run up to its first await (no timed sleep).

    Tasks run in FIFO order, so once this coroutine is resumed each earlier
    task has executed ``append`` up to waiting on its future, i.e. enqueued.
    """
    for _ in range(3):
        await asyncio.sleep(0)


def test_ids_round_trip_in_order(backend: Backend) -> None:
    cfg = StoreConfig(backend.url)

    async def body(store: MessageStore) -> list[StoredMessage]:
        for i in range(1, 51):
            await store.append(msg("a", i, ts=1000 + i))
        for i in range(1, 6):
            await store.append(msg("b", i, ts=2000 + i))
        assert store.last_ids() == {"a": 50, "b": 5}
        return store.read("a")

    got = run_with_store(cfg, body)
    assert [m.id for m in got] == list(range(1, 51))
    assert got[0] == StoredMessage("a", 1, "u", "m1", 1001)
    if isinstance(backend, SqliteBackend):
        assert Path(backend.path).exists()


def test_concurrent_appends_keep_room_order(backend: Backend) -> None:
    cfg = StoreConfig(backend.url, max_batch=7)

    async def body(store: MessageStore) -> None:
        await asyncio.gather(*(store.append(msg(f"r{i % 3}", i // 3 + 1)) for i in range(300)))
        for r in range(3):
            assert [m.id for m in store.read(f"r{r}")] == list(range(1, 101))
        assert store.last_ids() == {"r0": 100, "r1": 100, "r2": 100}
        assert store.committed_rows == 300

    run_with_store(cfg, body)


def test_restart_continues_last_ids(backend: Backend) -> None:
    path = backend.url

    async def first(store: MessageStore) -> None:
        for i in range(1, 31):
            await store.append(msg("room", i))
        await store.append(msg("other", 1))

    run_with_store(StoreConfig(path), first)

    async def second(store: MessageStore) -> None:
        assert store.last_ids() == {"room": 30, "other": 1}
        assert [m.id for m in store.read("room")] == list(range(1, 31))
        await store.append(msg("room", 31))

    run_with_store(StoreConfig(path), second)

    async def third(store: MessageStore) -> None:
        assert store.last_ids() == {"room": 31, "other": 1}

    run_with_store(StoreConfig(path), third)


def test_group_commit_batches_concurrent_appends(backend: Backend) -> None:
    path = backend.url

    async def body(store: MessageStore) -> None:
        lock = backend.lock_writes()  # the writer blocks on its first transaction
        tasks = [asyncio.create_task(store.append(msg("r", i))) for i in range(1, 201)]
        await let_tasks_enqueue()  # the writer holds at most one (blocked) batch meanwhile
        lock.release()
        await asyncio.gather(*tasks)
        assert store.committed_rows == 200
        assert store.commits <= 2, store.commits
        assert store.largest_batch >= 100
        assert [m.id for m in store.read("r", limit=500)] == list(range(1, 201))

    run_with_store(StoreConfig(path), body)


def test_max_batch_bounds_a_transaction(backend: Backend) -> None:
    path = backend.url

    async def body(store: MessageStore) -> None:
        lock = backend.lock_writes()
        tasks = [asyncio.create_task(store.append(msg("r", i))) for i in range(1, 101)]
        await let_tasks_enqueue()
        lock.release()
        await asyncio.gather(*tasks)
        assert store.largest_batch == 10
        assert store.commits >= 10
        assert store.last_ids() == {"r": 100}

    run_with_store(StoreConfig(path, max_batch=10), body)


def test_one_iterations_rows_reach_the_writer_as_one_transaction(backend: Backend) -> None:
    async def body(store: MessageStore) -> None:
        await asyncio.gather(*(store.append(msg("r", i)) for i in range(1, 51)))
        assert (store.commits, store.largest_batch) == (1, 50)
        await asyncio.gather(*(store.append(msg("r", i)) for i in range(51, 76)))
        assert (store.commits, store.largest_batch) == (2, 50)
        assert [m.id for m in store.read("r", limit=100)] == list(range(1, 76))

    run_with_store(StoreConfig(backend.url), body)


def test_read_filters(backend: Backend) -> None:
    async def body(store: MessageStore) -> None:
        for i in range(1, 21):
            await store.append(msg("r", i, ts=i * 100))
        await store.append(msg("x", 1, ts=150))
        assert [m.id for m in store.read("r", after_id=15)] == [16, 17, 18, 19, 20]
        assert [m.id for m in store.read("r", limit=3)] == [1, 2, 3]
        assert [m.id for m in store.read("r", after_id=5, limit=2)] == [6, 7]
        assert [m.id for m in store.read("r", after_timestamp=1750)] == [18, 19, 20]
        assert [m.id for m in store.read("r", after_timestamp=1800)] == [19, 20]
        assert [m.id for m in store.read("r", after_id=19, after_timestamp=100)] == [20]
        assert store.read("r", after_id=20) == []
        assert store.read("r", limit=0) == []
        assert store.read("missing") == []
        assert store.read("x") == [StoredMessage("x", 1, "u", "m1", 150)]
        with pytest.raises(ValueError):
            store.read("r", limit=-1)

    run_with_store(StoreConfig(backend.url), body)


def test_retention_by_count_keeps_last_ids(backend: Backend) -> None:
    async def body(store: MessageStore) -> None:
        for i in range(1, 11):
            await store.append(msg("a", i))
        for i in range(1, 3):
            await store.append(msg("b", i))
        assert store.apply_retention(now_ms=0) == 7  # a: 10 -> 3, b untouched
        assert [m.id for m in store.read("a")] == [8, 9, 10]
        assert [m.id for m in store.read("b")] == [1, 2]
        assert store.last_ids() == {"a": 10, "b": 2}
        assert store.apply_retention(now_ms=0) == 0
        await store.append(msg("a", 11))
        assert [m.id for m in store.read("a")] == [8, 9, 10, 11]

    run_with_store(StoreConfig(backend.url, retention_count=3), body)


def test_retention_by_age_keeps_last_ids(backend: Backend) -> None:
    path = backend.url

    async def body(store: MessageStore) -> None:
        for i in range(1, 11):
            await store.append(msg("a", i, ts=i * 1000))
        # older than now - age = 7000 -> ids 1..6 go, 7 (ts == cutoff) stays
        assert store.apply_retention(now_ms=12_000) == 6
        assert [m.id for m in store.read("a")] == [7, 8, 9, 10]
        assert store.apply_retention(now_ms=100_000) == 4
        assert store.read("a") == []
        assert store.last_ids() == {"a": 10}

    run_with_store(StoreConfig(path, retention_age_ms=5000), body)

    async def reopened(store: MessageStore) -> None:
        assert store.last_ids() == {"a": 10}
        await store.append(msg("a", 11, ts=200_000))
        assert [m.id for m in store.read("a")] == [11]

    run_with_store(StoreConfig(path), reopened)


def test_no_retention_configured_deletes_nothing(backend: Backend) -> None:
    async def body(store: MessageStore) -> None:
        await store.append(msg("a", 1, ts=0))
        assert store.apply_retention(now_ms=10**12) == 0
        assert len(store.read("a")) == 1

    run_with_store(StoreConfig(backend.url), body)


WEIRD = [
    'it\'s "quoted" ; DROP TABLE messages; --',
    "nul\x00inside\x00",
    "\x00",
    "emoji 🎉👩‍👩‍👧 and astral \U0001d54f",
    "عربي עברית mixed RTL \u202e override",
    "",
    "newline\nand\ttab and backslash \\ and %_ wildcards",
]


def test_weird_strings_round_trip(backend: Backend) -> None:
    path = backend.url

    async def body(store: MessageStore) -> None:
        for n, text in enumerate(WEIRD, start=1):
            await store.append(StoredMessage(text, 1, text, text, n))
            await store.append(StoredMessage("plain", n, text, text, n))

    run_with_store(StoreConfig(path), body)

    async def reread(store: MessageStore) -> None:
        # rooms differing only after a NUL must stay distinct
        assert store.last_ids() == {**{text: 1 for text in WEIRD}, "plain": len(WEIRD)}
        for n, text in enumerate(WEIRD, start=1):
            assert store.read(text) == [StoredMessage(text, 1, text, text, n)]
        plain = store.read("plain")
        assert [(m.user, m.content) for m in plain] == [(t, t) for t in WEIRD]

    run_with_store(StoreConfig(path), reread)


def test_unencodable_text_is_rejected_alone(backend: Backend) -> None:
    async def body(store: MessageStore) -> None:
        with pytest.raises(ValueError):
            await store.append(msg("r", 1, content="lone \ud800 surrogate"))
        await store.append(msg("r", 1))
        assert [m.content for m in store.read("r")] == ["m1"]

    run_with_store(StoreConfig(backend.url), body)


def test_commit_failure_reaches_every_waiter(backend: Backend) -> None:
    path = backend.url

    async def body(store: MessageStore) -> None:
        await store.append(msg("r", 1))
        commits_before = store.commits
        backend.refuse_inserts()  # a real failure inside the writer's transaction
        lock = backend.lock_writes()
        tasks = [asyncio.create_task(store.append(msg("r", i))) for i in range(2, 52)]
        await let_tasks_enqueue()
        lock.release()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert len(results) == 50
        for result in results:
            assert isinstance(result, Exception) and not isinstance(result, FencedError)
            assert "refused by trigger" in str(result)
        assert store.commits == commits_before
        assert store.last_ids() == {"r": 1}
        assert [m.id for m in store.read("r")] == [1]

        # The writer survives the failure and commits again once the cause is gone.
        backend.allow_inserts()
        await store.append(msg("r", 2))
        assert store.last_ids() == {"r": 2}

    run_with_store(StoreConfig(path), body)


def test_duplicate_id_fails_the_append(backend: Backend) -> None:
    async def body(store: MessageStore) -> None:
        await store.append(msg("r", 1, content="first"))
        with pytest.raises(backend.integrity_error):
            await store.append(msg("r", 1, content="second"))
        assert [m.content for m in store.read("r")] == ["first"]

    run_with_store(StoreConfig(backend.url), body)


def test_close_flushes_pending_and_rejects_later_appends(backend: Backend) -> None:
    path = backend.url

    async def main() -> None:
        store = open_store(StoreConfig(path))
        lock = backend.lock_writes()
        tasks = [asyncio.create_task(store.append(msg("r", i))) for i in range(1, 101)]
        closing = asyncio.create_task(store.close())
        await let_tasks_enqueue()  # close() enqueues its stop marker behind the rows
        lock.release()
        await closing
        await asyncio.gather(*tasks)  # every append queued before close() committed
        with pytest.raises(RuntimeError):
            await store.append(msg("r", 101))
        await store.close()  # idempotent

    asyncio.run(main())

    async def check(store: MessageStore) -> None:
        assert store.last_ids() == {"r": 100}
        assert len(store.read("r")) == 100

    run_with_store(StoreConfig(path), check)


def test_config_validation(tmp_path: Path) -> None:
    ok = str(tmp_path / "s.db")
    for bad in (
        dict(url=":memory:"),
        dict(url=""),
        dict(url="sqlite://"),
        dict(url="mysql://h/db"),
        dict(url=ok, synchronous="NORMAL; DROP TABLE x"),
        dict(url=ok, retention_count=-1),
        dict(url=ok, retention_age_ms=-5),
        dict(url=ok, max_batch=0),
        dict(url=ok, fence=(0, 1)),  # fencing needs a shared store
    ):
        with pytest.raises(ValueError):
            StoreConfig(**bad)
    assert StoreConfig(ok, synchronous="full").synchronous == "full"
    assert StoreConfig(f"sqlite://{ok}").path == ok
    assert StoreConfig("postgresql://u@h:5/db", fence=(0, 1)).kind == "postgresql"


def test_synchronous_full_is_applied(tmp_path: Path) -> None:
    async def body(store: Any) -> None:
        await store.append(msg("r", 1))
        # PRAGMA synchronous: 1 = NORMAL, 2 = FULL
        assert store._reader.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert store._reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    run_with_store(StoreConfig(str(tmp_path / "s.db"), synchronous="FULL"), body)


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from workers.chat.store import StoreConfig, StoredMessage, open_store

    async def main(url):
        store = open_store(StoreConfig(url))
        for i in range(1, 1_000_000):
            await store.append(StoredMessage("room", i, "u", "x" * 100, i))
            sys.stdout.write(f"{i}\\n")
            sys.stdout.flush()

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_acked_appends_survive_sigkill(backend: Backend) -> None:
    path = backend.url
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, path],
        stdout=subprocess.PIPE,
        env=env,
        cwd=str(REPO_ROOT),
        text=True,
    )
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        while len(acked) < 50:
            line = proc.stdout.readline()
            assert line, f"child exited early with {proc.wait()}"
            acked.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
        acked.extend(int(x) for x in rest.split())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert acked == list(range(1, len(acked) + 1))

    async def check(store: MessageStore) -> None:
        stored = [m.id for m in store.read("room", limit=10**9)]
        # every acked id is durable; ids stay gapless (an unacked tail may also be there)
        assert stored[: len(acked)] == acked
        assert stored == list(range(1, len(stored) + 1))
        assert store.last_ids()["room"] == len(stored)

    run_with_store(StoreConfig(path), check)


# -- PostgreSQL only: fenced writes and a lost link --------------------------------


def _set_lease(url: str, shard: int, token: int, ttl_s: float = 30) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO zrpc_leases (shard, holder, token, expires_at)"
            " VALUES (%s, 'test', %s, now() + %s * interval '1 second')"
            " ON CONFLICT (shard) DO UPDATE SET token = excluded.token,"
            " expires_at = excluded.expires_at", (shard, token, ttl_s))


def test_fenced_writes_stop_after_a_takeover(pg_server: PostgresServer) -> None:
    url = pg_server.new_database()
    run_with_store(StoreConfig(url), lambda store: asyncio.sleep(0))  # creates the schema
    _set_lease(url, 3, 7)

    async def body(store: MessageStore) -> None:
        await store.append(msg("r", 1))
        _set_lease(url, 3, 8)  # another worker took shard 3 over
        with pytest.raises(FencedError):
            await store.append(msg("r", 2))
        assert store.last_ids() == {"r": 1}
        _set_lease(url, 3, 7, ttl_s=-1)  # our token again, but expired: still fenced
        with pytest.raises(FencedError):
            await store.append(msg("r", 2))
        assert [m.id for m in store.read("r")] == [1]

    run_with_store(StoreConfig(url, fence=(3, 7)), body)


def test_writer_survives_a_killed_connection(pg_server: PostgresServer) -> None:
    url = pg_server.new_database()

    async def body(store: MessageStore) -> None:
        await store.append(msg("r", 1))
        with psycopg.connect(url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
        assert killed  # the store's reader and writer
        await asyncio.gather(*(store.append(msg("r", i)) for i in range(2, 21)))
        assert [m.id for m in store.read("r", limit=100)] == list(range(1, 21))

    run_with_store(StoreConfig(url), body)


# -- idempotency keys --------------------------------------------------------


def keyed(room: str, mid: int, key: str, ts: int = 0, user: str = "u") -> StoredMessage:
    return StoredMessage(room, mid, user, f"m{mid}", ts, key)


def test_idempotency_keys_survive_a_restart_and_retention(backend: Backend) -> None:
    path = backend.url

    async def first(store: MessageStore) -> None:
        await store.append(keyed("a", 1, "k1", ts=10))
        await store.append(keyed("a", 2, "k2", ts=20, user="v"))
        await store.append(msg("a", 3, ts=30))
        assert store.find_key("a", "u", "k1") == (1, 10)
        assert store.find_key("a", "v", "k1") is None  # keys are per room and user
        assert store.find_key("b", "u", "k1") is None
        assert [m.idempotency_key for m in store.read("a")] == ["k1", "k2", ""]

    run_with_store(StoreConfig(path), first)

    async def second(store: MessageStore) -> None:
        # history retention deletes messages but not the keys' window
        assert store.apply_retention(now_ms=10**6) == 3
        assert store.find_key("a", "u", "k1") == (1, 10)
        assert store.find_key("a", "v", "k2") == (2, 20)

    run_with_store(StoreConfig(path, retention_count=0), second)


def test_a_duplicate_key_fails_its_batch(backend: Backend) -> None:
    """The service never sends a key twice; if it did, nothing would be stored twice."""

    async def body(store: MessageStore) -> None:
        await store.append(keyed("a", 1, "k"))
        with pytest.raises(backend.integrity_error):
            await store.append(keyed("a", 2, "k"))
        assert [m.id for m in store.read("a")] == [1]

    run_with_store(StoreConfig(backend.url), body)


def test_key_window_is_age_and_count(backend: Backend) -> None:
    cfg = StoreConfig(backend.url, key_window_ms=1000, key_window_count=3,
                      key_prune_interval_s=3600)

    async def body(store: MessageStore) -> None:
        for i in range(1, 11):
            await store.append(keyed("a", i, f"k{i}", ts=i * 1000))
        await store.append(keyed("b", 1, "k1", ts=1000))
        # cutoff 7000: keys 1..6 are old; the 3 newest of "a" (8, 9, 10) stay anyway
        assert store.prune_keys(now_ms=8000) == 6
        assert [i for i in range(1, 11) if store.find_key("a", "u", f"k{i}")] == [7, 8, 9, 10]
        assert store.find_key("b", "u", "k1") == (1, 1000)  # the newest of its room
        # everything is old now: the 3 newest per room remain
        assert store.prune_keys(now_ms=10**9) == 1
        assert [i for i in range(1, 11) if store.find_key("a", "u", f"k{i}")] == [8, 9, 10]

    run_with_store(cfg, body)


def test_writer_prunes_keys_on_its_own(backend: Backend) -> None:
    cfg = StoreConfig(backend.url, key_window_ms=0, key_window_count=2, key_prune_interval_s=0)

    async def body(store: MessageStore) -> None:
        for i in range(1, 6):
            await store.append(keyed("a", i, f"k{i}", ts=i))
        # after a commit (and after notifying its waiters) the writer prunes "a"
        # down to its 2 newest keys
        await store.close()  # joins the writer thread

    run_with_store(cfg, body)

    async def check(store: MessageStore) -> None:
        assert [i for i in range(1, 6) if store.find_key("a", "u", f"k{i}")] == [4, 5]

    run_with_store(StoreConfig(backend.url, key_prune_interval_s=3600), check)


def test_a_database_without_the_key_column_is_upgraded(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE rooms (name TEXT PRIMARY KEY, last_id INTEGER NOT NULL);"
        "CREATE TABLE messages (room TEXT NOT NULL, id INTEGER NOT NULL,"
        " user_name TEXT NOT NULL, content TEXT NOT NULL, ts INTEGER NOT NULL,"
        " PRIMARY KEY (room, id));"
        "INSERT INTO messages VALUES ('a', 1, 'u', 'old', 5);"
        "INSERT INTO rooms VALUES ('a', 1);")
    conn.close()

    async def body(store: MessageStore) -> None:
        await store.append(keyed("a", 2, "k"))
        assert store.read("a") == [StoredMessage("a", 1, "u", "old", 5),
                                   StoredMessage("a", 2, "u", "m2", 0, "k")]
        assert store.find_key("a", "u", "k") == (2, 0)

    run_with_store(StoreConfig(path), body)


def test_last_timestamp_after_a_restart(backend: Backend) -> None:
    async def first(store: MessageStore) -> None:
        for i in range(1, 6):
            await store.append(msg("a", i, ts=1000 + i))

    run_with_store(StoreConfig(backend.url), first)

    async def second(store: MessageStore) -> None:
        last_ids = store.last_ids()  # as the service does when it starts
        assert store.last_timestamp("a", last_ids["a"]) == 1005
        assert store.last_timestamp("never", 0) == 0
        await store.append(msg("a", 6, ts=2000))  # written since: still exact
        assert store.last_timestamp("a", 6) == 2000

    run_with_store(StoreConfig(backend.url), second)
