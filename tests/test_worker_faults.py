"""Broker <-> worker faults with real processes: configuration handed to workers, settings
that must agree, misconfigurations that cannot heal, hung workers, stalled brokers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zrpc
from cluster.config import WorkerConfig
from procs import BIN, BrokerProc, children, connect, env_for, start_broker, start_worker, wait_for
from zrpc.status import Status

pytestmark = pytest.mark.multiprocess

MiB = 1024 * 1024


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def no_traceback(*logs: str) -> None:
    for text in logs:
        assert "Traceback" not in text, text


@pytest.fixture
def big_broker(tmp_path: Path) -> Iterator[BrokerProc]:
    b = start_broker(tmp_path, "--workers", "2", "--max-message-size", str(8 * MiB))
    try:
        yield b.wait_ready()
    finally:
        b.stop()


def test_worker_config_round_trips_and_refuses_unknown_fields() -> None:
    cfg = WorkerConfig(shard=1, shards=2, brokers=("ipc:///tmp/x/broker.ipc",), bus="ipc:///tmp/x/bus-1.ipc",
                       data_dir="/tmp/x", max_message_size=8 * MiB, app_options={"rate_per_s": 5.0})
    again = WorkerConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.server.max_message_size == 8 * MiB
    assert again.server.settings().announce()["max_message_size"] == 8 * MiB
    with pytest.raises(ValueError, match="unknown field"):
        WorkerConfig.from_json(cfg.to_json()[:-1] + ',"surprise":1}')
    with pytest.raises(ValueError, match=r"shard must be in 0\.\.1"):
        WorkerConfig.from_json(cfg.to_json().replace('"shard":1', '"shard":2'))


def test_five_mib_request_under_an_eight_mib_broker_limit(big_broker: BrokerProc, tmp_path: Path) -> None:
    """--max-message-size reaches the workers: 5 MiB goes through both hops and back."""
    async def main() -> None:
        client = await connect(big_broker, tmp_path, max_message_size=8 * MiB)
        try:
            blob = "x" * (5 * MiB)
            reply = await client.unary("Echo/Say", {"key": "k", "blob": blob}, dict)
            assert len(reply["blob"]) == 5 * MiB
            # The connection is still good for the next call.
            assert (await client.unary("Echo/Say", {"key": "k2"}, dict))["key"] == "k2"
            with pytest.raises(zrpc.RpcError) as err:
                await client.unary("Echo/Say", {"key": "k", "blob": "y" * (9 * MiB)}, dict)
            assert err.value.status is Status.RESOURCE_EXHAUSTED
            assert (await client.unary("Echo/Say", {"key": "k3"}, dict))["key"] == "k3"
        finally:
            await client.close()
    run(main())
    no_traceback(big_broker.output())


def test_spawned_workers_are_zrpc_worker_processes(big_broker: BrokerProc) -> None:
    kids = children(big_broker.pid)
    assert len(kids) == 2
    for pid in kids:
        line = cmdline(pid)
        assert "zrpc-worker" in line and "--config" in line, line
    found = subprocess.run(["pgrep", "-f", "zrpc-worker"], capture_output=True, text=True).stdout.split()
    assert set(map(str, kids)) <= set(found)


def external_worker(tmp_path: Path, *args: str) -> tuple[BrokerProc, Any]:
    router = f"ipc://{tmp_path}/router.ipc"
    broker = start_broker(tmp_path, "--workers", "0", "--shards", "2", "--router", router, app=None)
    wait_for(lambda: "listening" in broker.output(), 20, what="broker listening")
    worker = start_worker(tmp_path, "--shard", "0", "--broker", router, "--data-dir", str(tmp_path / "d"),
                          "--app", "tests.apps.echo:app", *args)
    return broker, worker


@pytest.mark.parametrize(("args", "reason"), [
    (("--shards", "3", "--heartbeat-ms", "200"), "worker is configured for 3 shards; this broker runs 2"),
    (("--shards", "2", "--heartbeat-ms", "1000"), "start the worker with --heartbeat-ms 200"),
    (("--shards", "2", "--heartbeat-ms", "200", "--max-message-size", "65536"),
     "start the worker with --max-message-size 4194304"),
])
def test_worker_refused_for_good_exits_with_the_reason(tmp_path: Path, args: tuple[str, ...],
                                                       reason: str) -> None:
    broker, worker = external_worker(tmp_path, *args)
    try:
        assert worker.wait(20) == 78
        out = worker.output()
        assert reason in out.splitlines()[-1]
        assert "registering again" not in out
        no_traceback(out, broker.output())
    finally:
        worker.stop()
        broker.stop()


def test_broker_gives_up_on_a_worker_that_cannot_start(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, "--workers", "1", app="nosuch:thing")
    try:
        code = broker.wait(30)
        out = broker.output()
        assert code == 1, out
        last = out.strip().splitlines()[-1]
        assert "worker for shard 0 failed 5 times at start-up (exit status 2)" in last
        assert "nosuch" in last
        no_traceback(out)
    finally:
        broker.stop()


def test_listen_without_a_port_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([str(BIN / "zrpc-broker"), "start", "--listen", "localhost", "--workers", "0",
                           "--shards", "1"], env=env_for(tmp_path), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert "--listen" in proc.stderr and "port" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stale_runtime_dirs_of_dead_brokers_are_removed(tmp_path: Path) -> None:
    base = tmp_path / "run"
    base.mkdir()
    env = {"XDG_RUNTIME_DIR": str(base)}
    first = start_broker(tmp_path, "--workers", "1", name="first", env=env).wait_ready()
    second = None
    try:
        runtime = Path(first.info["router"].removeprefix("ipc://")).parent
        assert runtime.parent == base
        workers = children(first.pid)
        first.signal(signal.SIGKILL)
        first.wait(10)
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), 10, what="workers gone")
        assert runtime.exists()  # left behind by the SIGKILL
        live = start_broker(tmp_path, "--workers", "1", name="live", env=env).wait_ready()
        live_runtime = Path(live.info["router"].removeprefix("ipc://")).parent
        try:
            second = start_broker(tmp_path, "--workers", "1", name="second", env=env).wait_ready()
            assert not runtime.exists()
            assert live_runtime.exists()  # a live broker's directory is kept
        finally:
            live.stop()
    finally:
        if second is not None:
            second.stop()
        first.stop()
