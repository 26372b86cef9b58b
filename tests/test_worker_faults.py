"""Broker <-> worker faults with real processes: configuration handed to workers, settings
that must agree, misconfigurations that cannot heal, hung workers, stalled brokers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zrpc
from cluster.config import WorkerConfig
from procs import (
    BIN,
    BrokerProc,
    children,
    connect,
    env_for,
    eventually,
    start_broker,
    start_worker,
    wait_for,
)
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


# ------------------------------------------------------------ stalls and hangs (11.4, 11.5)


def _chat_types() -> Any:
    from zrpc import chat
    return chat


def test_stalled_broker_and_its_workers_agree(tmp_path: Path) -> None:
    """SIGSTOP the broker past the workers' liveness: the workers drop its sessions, and the
    broker ends the streams those sessions served with UNAVAILABLE; the same connections then
    work again, and presence is right once the clients resume."""
    chat = _chat_types()
    broker = start_broker(tmp_path, "--workers", "1", app=None).wait_ready()
    room = "stall"

    async def main() -> None:
        ann = await connect(broker, tmp_path)
        bob = await connect(broker, tmp_path)
        try:
            async def list_users(c: zrpc.Client) -> list[str]:
                r = await c.unary("Chat/ListUsers", chat.ListUsersRequest(room=room), chat.ListUsersResponse)
                return sorted(u.name for u in r.users)

            async def answered(c: zrpc.Client) -> tuple[list[str]] | None:
                """ListUsers, or None while the shard is re-registering (UNAVAILABLE: retry)."""
                try:
                    return (await list_users(c),)
                except zrpc.RpcError as exc:
                    if exc.status is not Status.UNAVAILABLE:
                        raise
                    return None

            async def subscribe_both() -> dict[str, Any]:
                """One after the other: each is present before the next one joins."""
                subs, present = {}, []
                for name, c in (("ann", ann), ("bob", bob)):
                    subs[name] = await c.server_stream("Chat/SubscribeToRoom",
                                                       chat.SubscribeRequest(room=room, user=name),
                                                       chat.ChatResponse)
                    present.append(name)
                    want = sorted(present)

                    async def arrived(want: list[str] = want) -> bool:
                        return await answered(ann) == (want,)

                    await eventually(arrived, 10, f"{present} present")
                return subs

            subs = await subscribe_both()

            broker.signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(5)  # the stall itself (liveness is 3 x 200 ms)
            finally:
                broker.signal(signal.SIGCONT)

            async def ends(s: Any) -> zrpc.RpcError:
                try:
                    async for _ in s:
                        pass
                except zrpc.RpcError as exc:
                    return exc
                raise AssertionError("stream ended without an error")

            errors = await asyncio.wait_for(asyncio.gather(*(ends(s) for s in subs.values())), 15)
            assert [e.status for e in errors] == [Status.UNAVAILABLE, Status.UNAVAILABLE], errors

            # The older connections carry new calls (no "OPEN frame before HELLO"), and nobody
            # is reported present whose stream has ended.
            assert await eventually(lambda: answered(bob), 10, "the old connection to answer") == ([],)
            subs = await subscribe_both()  # the clients resume
            sent = await ann.unary("Chat/SendMessage", chat.Message(user="ann", content="back", room=room),
                                   chat.ChatResponse)
            assert sent.type is chat.ResponseType.ack

            async def next_message(s: Any) -> str:
                async for ev in s:
                    if ev.type is chat.ResponseType.message and ev.message is not None:
                        return str(ev.message.content)
                raise AssertionError("stream ended")

            assert await asyncio.wait_for(next_message(subs["bob"]), 10) == "back"
        finally:
            await ann.close()
            await bob.close()

    try:
        run(main())
        out = broker.output()
        assert "OPEN frame before HELLO" not in out
        assert "dropped this broker's sessions" in out or "reconnected" in out or \
            "stopped answering heartbeats" in out
        no_traceback(out)
    finally:
        broker.stop()


@pytest.mark.timeout(90)
def test_hung_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, "--workers", "2").wait_ready()
    try:
        old = sorted(children(broker.pid))
        assert len(old) == 2
        victim = old[0]
        os.kill(victim, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            # declared dead after 3 x 200 ms, killed after the 5 s grace, restarted after 0.1 s
            wait_for(lambda: not Path(f"/proc/{victim}").exists()
                     or Path(f"/proc/{victim}/stat").read_text().split()[2] == "Z", 20,
                     what="the hung worker to be killed")
            killed_after = time.monotonic() - t0
            new = wait_for(lambda: (lambda k: k if len(k) == 2 and victim not in k else None)(
                sorted(children(broker.pid))), 20, what="a replacement worker")
            assert old[1] in new
            assert 5.0 <= killed_after <= 15.0, killed_after
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)

        async def main() -> None:
            c = await connect(broker, tmp_path)
            try:
                seen = set()
                for i in range(40):
                    r = await asyncio.wait_for(c.unary("Echo/Say", {"key": f"k{i}"}, dict), 10)
                    seen.add(r["pid"])
                assert seen == set(new)  # both shards served, one by the replacement
            finally:
                await c.close()

        wait_for(lambda: "registered for shard" in broker.output().split(f"pid {victim} stopped")[-1]
                 if f"pid {victim} stopped" in broker.output() else False, 20, what="replacement registered")
        run(main())
        out = broker.output()
        assert f"worker pid {victim} stopped answering; terminating it" in out
        no_traceback(out)
    finally:
        broker.stop()
