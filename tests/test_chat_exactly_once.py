"""Exactly-once sends and resuming chats against a real broker and real workers.

* Retrying clients (pipelined, 128 sends in flight) keep sending while a busy shard's worker is SIGKILLed
  several times: every message sent is stored exactly once, ids contiguous.
* ``zrpc chat`` survives a broker restart: it joins again as the same user,
  shows what it missed, sends what was typed meanwhile, repeats nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
import uvloop

import zrpc
from cluster.sharding import shard_for
from procs import BIN, BrokerProc, children, env_for, start_broker, wait_for
from zrpc.chat import ChatResponse, ResponseType, SubscribeRequest
from zrpc.chat_client import Backoff, ChatClient

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(150)]
ZRPC = str(BIN / "zrpc")
WINDOW = 8  # sends in flight per sender: 128 in all, as pipelined clients do


def shard_worker(broker: BrokerProc, shard: int) -> int | None:
    """The pid of the broker's worker process for ``shard`` (None while it is restarting)."""
    for pid in children(broker.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--shard" in argv and argv[argv.index(b"--shard") + 1] == str(shard).encode():
            return pid
    return None


async def history(client: zrpc.Client, room: str, count: int) -> list[tuple[int, str]]:
    """The first ``count`` stored messages of ``room`` as (id, content)."""
    stream = await client.server_stream("Chat/SubscribeToRoom",
                                        SubscribeRequest(room=room, user="auditor", since_id=0),
                                        ChatResponse)
    got: list[tuple[int, str]] = []
    try:
        while len(got) < count:
            r = await asyncio.wait_for(stream.next(), 20)
            assert r is not None
            if r.type is ResponseType.message and r.message is not None:
                got.append((r.message.id, r.message.content))
            elif r.type is ResponseType.user_joined and r.user_joined == "auditor":
                break  # attached: the whole history was replayed
    finally:
        await stream.close()
    return got


def test_killing_the_worker_under_retrying_senders_stores_each_message_once(tmp_path: Path) -> None:
    """Without keys the same run stores duplicates (32 of 480 in two runs on 2 Dec 2026):
    a SIGKILL lands between commit and ack for the calls in flight."""
    room, senders, per_sender, kills = "busy", 16, 30, 3
    broker = start_broker(tmp_path, "--shards", "2", "--chat-rate-per-s", "0", app=None)
    try:
        broker.wait_ready()
        shard = shard_for(room, 2)
        tls = zrpc.TlsConfig.client(tmp_path)  # trusts the broker's development CA

        async def main() -> None:
            policy = Backoff(initial=0.02, maximum=0.3)
            clients = [await ChatClient.connect(broker.address, tls, timeout=30, retry=policy)
                       for _ in range(4)]
            acked: list[int] = []

            async def sender(k: int) -> None:
                chat = clients[k % len(clients)]

                async def one(i: int) -> None:
                    stored = await chat.send(room, f"u{k}", f"{k}-{i}")
                    acked.append(stored.id)

                for w in range(0, per_sender, WINDOW):  # pipelined: WINDOW sends in flight
                    await asyncio.gather(*(one(i) for i in range(w, min(w + WINDOW, per_sender))))

            sending_done = asyncio.Event()

            async def killer() -> list[int]:
                killed: list[int] = []
                for _ in range(kills):
                    start = len(acked)
                    while len(acked) < start + 40:  # busy again (after a restart) before each kill
                        if sending_done.is_set():
                            return killed  # the load ended first: reported below
                        await asyncio.sleep(0.005)
                    pid = shard_worker(broker, shard)
                    while pid is None or pid in killed:
                        await asyncio.sleep(0.02)  # polling for the supervisor's replacement
                        pid = shard_worker(broker, shard)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return killed

            try:
                killing = asyncio.ensure_future(killer())
                await asyncio.gather(*(sender(k) for k in range(senders)))
                sending_done.set()
                killed = await asyncio.wait_for(killing, 30)
                assert len(killed) == kills, f"the load ended after {len(killed)} of {kills} kills"
                total = senders * per_sender
                retries = sum(c.retries for c in clients)
                assert retries > 0, "no send was retried: the kills missed the load"
                stored = await history(clients[0].client, room, total + 1)
                counts = Counter(content for _, content in stored)
                assert [c for c, n in counts.items() if n > 1] == []  # nothing stored twice
                assert set(counts) == {f"{k}-{i}" for k in range(senders)
                                       for i in range(per_sender)}  # nothing lost
                assert [mid for mid, _ in stored] == list(range(1, total + 1))  # contiguous
                assert sorted(acked) == list(range(1, total + 1))  # every ack names its own id
            finally:
                for c in clients:
                    await c.close()

        uvloop.run(main())
    finally:
        broker.stop()


def test_zrpc_chat_resumes_after_a_broker_restart(tmp_path: Path) -> None:
    first = start_broker(tmp_path, app=None, name="b1")
    second = None
    chat = None
    try:
        first.wait_ready()
        address = first.address
        env = env_for(tmp_path)
        env["ZRPC_SERVER"] = address

        def zrpc_cmd(*args: str) -> subprocess.CompletedProcess[str]:
            p = subprocess.run([ZRPC, *args], env=env, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, f"zrpc {args} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
            return p

        chat = subprocess.Popen([ZRPC, "--json", "chat", "--room", "keep", "--user", "ann"],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, bufsize=1)
        assert chat.stdin is not None and chat.stdout is not None and chat.stderr is not None
        said: list[tuple[int, str]] = []
        errors: list[str] = []
        out, err = chat.stdout, chat.stderr

        def read_out() -> None:
            for line in out:
                e = json.loads(line)
                if e.get("type") == "message":
                    said.append((e["message"]["id"], e["message"]["content"]))

        def read_err() -> None:
            errors.extend(err)

        readers = [threading.Thread(target=f, daemon=True) for f in (read_out, read_err)]
        for t in readers:
            t.start()
        chat.stdin.write("before\n")
        wait_for(lambda: (1, "before") in said, what="the first line echoed")
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0
        wait_for(lambda: any("reconnecting" in line for line in errors), what="the status line")
        chat.stdin.write("typed while away\n")
        second = start_broker(tmp_path, "--listen", address, app=None, name="b2").wait_ready()
        zrpc_cmd("send", "--room", "keep", "--user", "bob", "sent while ann was away")
        wait_for(lambda: len(said) >= 3, timeout=30, what="the resumed chat")
        chat.stdin.write("after\n")
        chat.stdin.close()
        assert chat.wait(30) == 0, "".join(errors)
        for t in readers:
            t.join(5)
        contents = [c for _, c in said]
        assert sorted(contents) == sorted(["before", "typed while away", "sent while ann was away",
                                           "after"]), said
        assert [i for i, _ in said] == [1, 2, 3, 4]  # each once, in id order
        assert sum("reconnecting" in line for line in errors) == 1, errors  # one status line
        assert any("reconnected to keep" in line for line in errors), errors
        replay = [json.loads(line) for line in zrpc_cmd(
            "--json", "subscribe", "--room", "keep", "--user", "w", "--since-id", "0",
            "--count", "4").stdout.splitlines()]
        assert sorted(e["message"]["content"] for e in replay) == sorted(contents)
    finally:
        if chat is not None:
            chat.kill()
            chat.wait(10)
        first.stop()
        if second is not None:
            second.stop()
