"""What operators see: the broker's INFO log, its metrics, ``zrpc health``, store failures.

* :class:`zrpc.ratelog.RateLimitedLog` and :class:`broker.activity.Activity` with a fake clock.
* A real broker (``--auth-secret``, ``--metrics-port``, a short
  ``--log-summary-interval``): its log says where the metrics are, refuses a
  bad token at INFO once per interval, sums up the activity, says "stopped";
  every call is counted in ``zrpc_calls_total`` (built-ins and cancelled
  streams too) as in the latency histogram; fan-out sums are counters.
* ``zrpc health`` against a broker missing a shard names it.
* A commit that fails for a full disk (SQLite's ``max_page_count``) is logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import uvloop

import zrpc
from broker.activity import Activity
from procs import BIN, connect, env_for, start_broker, wait_for
from zrpc.auth import mint_token
from zrpc.ratelog import RateLimitedLog
from zrpc.status import Status

SECRET = "observability-test-secret-32-bytes!"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_log_counts_what_it_leaves_out(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("zrpc.test.ratelog"), 10.0, clock)
    with caplog.at_level(logging.INFO, "zrpc.test.ratelog"):
        assert limited.log("a", logging.INFO, "first %s", "a")
        for _ in range(5):
            assert not limited.log("a", logging.INFO, "again")
        assert limited.log("b", logging.INFO, "other kind")  # keys are independent
        clock.now += 10
        assert limited.log("a", logging.INFO, "later")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["first a", "other kind", "later (5 more like it not logged in the last 10s)"]


def test_activity_summary_and_refusals(caplog: pytest.LogCaptureFixture) -> None:
    activity = Activity(logging.getLogger("zrpc.test.activity"), interval_s=60)
    with caplog.at_level(logging.DEBUG, "zrpc.test.activity"):
        assert activity.summary(0) is None  # nothing happened: no line
        activity.connection_opened("1.2.3.4:5")
        activity.connection_opened("1.2.3.4:6")
        activity.connection_closed("1.2.3.4:5", Status.OK, "client closing")
        activity.connection_closed("1.2.3.4:6", Status.UNAUTHENTICATED, "invalid token: bad signature")
        activity.call_done("Echo/Say", Status.OK)
        activity.call_done("Echo/Say", Status.UNAVAILABLE)
        activity.call_done("Chat/SendMessage", Status.RESOURCE_EXHAUSTED, "rate limit")
        line = activity.summary(1)
    assert line == "activity: connections=1 (+2 -2), calls=3, errors UNAVAILABLE=1 RESOURCE_EXHAUSTED=1"
    assert activity.summary(1) is None  # the next period starts empty
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["refused connection from 1.2.3.4:6: UNAUTHENTICATED: invalid token: bad signature",
                     "refused call Chat/SendMessage: RESOURCE_EXHAUSTED: rate limit"]
    debugs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "connection from 1.2.3.4:5 opened" in debugs
    assert "connection from 1.2.3.4:5 closed: OK: client closing" in debugs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> tuple[dict[str, float], str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    return values, text


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_broker_log_and_metrics(tmp_path: Path) -> None:
    port = free_port()
    b = start_broker(tmp_path, "--auth-secret", SECRET, "--metrics-port", str(port),
                     "--log-summary-interval", "0.3")
    try:
        b.wait_ready()
        token = mint_token(SECRET, "ops")

        async def main() -> None:
            for _ in range(3):  # refused at HELLO: one INFO line, then counted
                with pytest.raises(zrpc.RpcError):
                    bad = await connect(b, tmp_path, token="not-a-token")
                    await bad.unary("Echo/Say", {"key": "m"}, dict)
            c = await connect(b, tmp_path, token=token)
            assert (await c.unary("Health/Check", {}, dict))["status"] == "SERVING"
            await c.unary("Reflection/List", {}, dict)
            listen = await c.server_stream("Echo/Listen", {"key": "m"}, dict)
            assert await listen.next() == {"attached": True}
            await c.unary("Echo/Publish", {"key": "m", "count": 2}, dict)
            for _ in range(2):
                await listen.next()
            await listen.close()  # cancelled by the client
            await c.unary("Echo/Say", {"key": "m"}, dict)
            await c.close()

        uvloop.run(main())

        def counted() -> dict[str, float] | None:
            values, _ = scrape(port)
            return values if values.get('zrpc_calls_total{method="Echo/Listen",status="CANCELLED"}') else None

        values = wait_for(counted, 20, what="the cancelled stream in zrpc_calls_total")
        _, text = scrape(port)
        for method, status in (("Health/Check", "OK"), ("Reflection/List", "OK"), ("Echo/Say", "OK"),
                               ("Echo/Publish", "OK"), ("Echo/Listen", "CANCELLED")):
            assert values[f'zrpc_calls_total{{method="{method}",status="{status}"}}'] == 1, method
            assert values[f'zrpc_call_seconds_count{{method="{method}"}}'] == 1, method
        assert values["zrpc_fanout_deliveries_total"] == 2
        for name in ("deliveries", "gaps", "repairs"):
            assert f"# TYPE zrpc_fanout_{name}_total counter" in text
        log = wait_for(lambda: b.output() if "activity: " in b.output() else None, 20,
                       what="the activity summary line")
        assert f"metrics on http://127.0.0.1:{port}/metrics" in log
        refused = [line for line in log.splitlines() if "refused connection from" in line]
        assert refused and "UNAUTHENTICATED" in refused[0] and "level=INFO" in refused[0]
        assert len(refused) == 1  # three refusals within the interval: one line
        assert re.search(r"activity: connections=\d+ \(\+\d+ -\d+\), calls=\d+", log)
    finally:
        b.stop()
    assert "msg=stopped" in b.output()
    assert "Traceback" not in b.output()


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_health_names_the_missing_shards(tmp_path: Path) -> None:
    # Two shards, one worker spawned for shard 0 only: shard 1 has no live worker.
    b = start_broker(tmp_path, "--workers", "1", "--shards", "2")
    try:
        def answered() -> subprocess.CompletedProcess[str] | None:
            if b.popen is not None and b.popen.poll() is not None:
                raise AssertionError(b.output())
            m = re.search(r"listening on (\S+):(\d+)", b.output())
            if m is None:
                return None
            p = subprocess.run([str(BIN / "zrpc"), "--server", f"{m[1]}:{m[2]}", "health"],
                               env=env_for(tmp_path), capture_output=True, text=True, timeout=30)
            return p if "shard(s) 1 of 2" in p.stdout else None

        p = wait_for(answered, 30, interval=0.2, what="health naming shard 1")
        assert p.returncode == 1
        assert p.stdout.strip() == "NOT_SERVING: no live worker for shard(s) 1 of 2"
    finally:
        b.stop()


def test_failed_commit_is_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    from workers.chat import store as store_mod
    from workers.chat import store_sqlite

    real_connect = store_sqlite._connect

    def small_disk(*args: Any, **kwargs: Any) -> Any:
        conn = real_connect(*args, **kwargs)
        conn.execute("PRAGMA max_page_count = 64")  # a full disk, as SQLite reports it
        return conn

    monkeypatch.setattr(store_sqlite, "_connect", small_disk)

    async def fill() -> BaseException:
        store = store_mod.open_store(store_mod.StoreConfig(url=str(tmp_path / "full.sqlite")))
        try:
            for i in range(1, 10_000):
                await store.append(store_mod.StoredMessage("room", i, "u", "x" * 2000, i))
        except Exception as exc:
            return exc
        finally:
            await store.close()
        raise AssertionError("the disk never filled up")

    with caplog.at_level(logging.ERROR, "zrpc.chat.store"):
        error = asyncio.run(fill())
    assert "full" in str(error)
    lines = [r.getMessage() for r in caplog.records if r.name == "zrpc.chat.store"]
    assert lines and "commit of" in lines[0] and "full" in lines[0]


def test_every_metric_is_documented() -> None:
    from broker.metrics import BrokerMetrics
    from zrpc.fanout import FanOut

    metrics = BrokerMetrics()
    metrics.bind(FanOut(), live_workers=lambda: 0, connections=lambda: 0)
    names = {family.name for family in metrics.registry.collect()}
    assert "zrpc_fanout_deliveries" in names and "zrpc_call_seconds" in names
    docs = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    for family in metrics.registry.collect():
        shown = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{shown}" in docs, f"{shown} ({family.type}) is not in docs/operations.md"


def test_a_connection_flood_is_one_log_line(caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """admit_connection past max_connections_per_ip: every refusal answered, one WARNING per 10 s."""
    from zrpc import limits
    from zrpc.limits import IpCounter, admit_connection

    monkeypatch.setattr(limits, "_refusals", RateLimitedLog(limits.log, 10.0))  # a fresh interval

    class Transport:  # a test double of an asyncio transport from 10.0.0.9
        def __init__(self) -> None:
            self.written = b""
            self.closed = False

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("10.0.0.9", 4242) if name == "peername" else default

        def write(self, data: bytes) -> None:
            self.written += data

        def close(self) -> None:
            self.closed = True

        def abort(self) -> None:
            self.closed = True

    async def flood() -> list[Transport]:
        per_ip = IpCounter(1)
        assert admit_connection(Transport(), serving=True, open_connections=0, max_connections=100,
                                per_ip=per_ip) == "10.0.0.9"
        refused = [Transport() for _ in range(500)]
        for t in refused:
            assert admit_connection(t, serving=True, open_connections=1, max_connections=100,
                                    per_ip=per_ip) is None
        return refused

    with caplog.at_level(logging.INFO, "zrpc.limits"):
        refused = asyncio.run(flood())
    assert all(t.closed and b"max_connections_per_ip" in t.written for t in refused)
    lines = [r.getMessage() for r in caplog.records if r.name == "zrpc.limits"]
    assert len(lines) == 1 and "max_connections_per_ip (1)" in lines[0], lines
