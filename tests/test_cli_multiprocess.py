"""The `zrpc` commands against a real `zrpc-broker start`: scripting, a pty chat, a broker restart."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from procs import BIN, BrokerProc, env_for, start_broker, wait_for

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]
ZRPC = str(BIN / "zrpc")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProc]:
    b = start_broker(tmp_path, "--quic-listen", "127.0.0.1:0", app=None)
    try:
        yield b.wait_ready()
    finally:
        b.stop()


def zrpc(env: dict[str, str], *args: str, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([ZRPC, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, f"zrpc {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def client_env(tmp_path: Path, address: str) -> dict[str, str]:
    env = env_for(tmp_path)
    env["ZRPC_SERVER"] = address
    return env


@pytest.mark.parametrize("transport", ["tls", "quic"])
def test_every_command_scripted_with_json(broker: BrokerProc, tmp_path: Path, transport: str) -> None:
    env = client_env(tmp_path, broker.address if transport == "tls" else f"quic://{broker.info['quic']}")
    assert zrpc(env, "health").returncode == 0
    methods = {m["name"] for m in lines(zrpc(env, "--json", "list").stdout)}
    assert {"Chat/SendMessage", "Chat/SendMessageBatch", "Chat/SubscribeToRoom", "Chat/JoinChat",
            "Chat/ListUsers", "Health/Check"} <= methods
    sent = lines(zrpc(env, "--json", "send", "--room", "ops", "--user", "ann", "hello", "world").stdout)
    assert sent[-1]["id"] == 1 and sent[-1]["content"] == "hello world"
    summary = lines(zrpc(env, "--json", "batch", "--room", "ops", "--user", "bob", "-",
                         stdin='two\n{"user": "cy", "content": "three"}\n').stdout)[-1]
    assert summary["total_messages"] == 2 and summary["users"] == ["bob", "cy"]
    events = lines(zrpc(env, "--json", "subscribe", "--room", "ops", "--user", "dee", "--since-id", "0",
                        "--count", "3").stdout)
    assert [e["message"]["content"] for e in events] == ["hello world", "two", "three"]
    called = lines(zrpc(env, "--json", "call", "Chat/SendMessage",
                        '{"room": "ops", "user": "eve", "content": "via call"}').stdout)
    assert called[-1]["message"]["id"] == 4
    assert zrpc(env, "--json", "who", "--room", "ops").returncode == 0
    bad = zrpc(env, "send", "--room", "ops", "--user", "ann", "x" * 20_000, check=False)  # over the size limit
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr
    down = zrpc(client_env(tmp_path, "127.0.0.1:1"), "health", check=False)
    assert down.returncode == 3 and "UNAVAILABLE" in down.stderr


def test_piped_chat_between_two_users(broker: BrokerProc, tmp_path: Path) -> None:
    env = client_env(tmp_path, broker.address)
    watcher = subprocess.Popen([ZRPC, "--json", "subscribe", "--room", "pipe", "--user", "w", "--count", "7"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(u["name"] == "w" for u in lines(zrpc(env, "--json", "who", "--room", "pipe").stdout)),
                 what="watcher present")
        zrpc(env, "chat", "--room", "pipe", "--user", "ann", stdin="hi from ann\n")
        zrpc(env, "chat", "--room", "pipe", "--user", "ben", stdin="hi from ben\n")
        out, _ = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    events = lines(out)
    said = [e["message"]["content"] for e in events if e["type"] == "message"]
    assert said == ["hi from ann", "hi from ben"]
    assert [e.get("user_joined") or e.get("user_left") for e in events if e["type"] != "message"] == \
        ["w", "ann", "ann", "ben", "ben"]


def test_two_users_chat_on_real_terminals(broker: BrokerProc, tmp_path: Path) -> None:
    env = client_env(tmp_path, broker.address)
    env["TERM"] = "xterm"
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    ann = pexpect.spawn(ZRPC, ["chat", "--room", "tty", "--user", "ann"], env=env, encoding="utf-8", timeout=30,
                        dimensions=(24, 100))
    ben = None
    try:
        ann.expect(r"ann\S* joined")  # ann is in the room (and sees its events) before ben comes
        ben = pexpect.spawn(ZRPC, ["chat", "--room", "tty", "--user", "ben"], env=env, encoding="utf-8",
                            timeout=30, dimensions=(24, 100))
        ann.expect(r"ben\S* joined")
        ann.sendline("hello ben")
        ben.expect(r"ann\S*: hello ben")
        ben.sendline("/who")
        ben.expect(r"ann\S*.*1 message")
        ben.sendline("hi ann")
        ann.expect(r"ben\S*: hi ann")
        ben.sendline("/quit")
        ben.expect(pexpect.EOF)
        ann.expect(r"ben\S* left")
        ann.sendeof()
        ann.expect(pexpect.EOF)
    finally:
        for p in (ann, ben):
            if p is not None:
                p.close(force=True)


def test_subscribe_survives_a_broker_restart_without_gaps_or_repeats(tmp_path: Path) -> None:
    first = start_broker(tmp_path, app=None, name="b1")
    second = None
    sub = None
    try:
        first.wait_ready()
        address = first.address
        env = client_env(tmp_path, address)
        for i in range(1, 6):
            zrpc(env, "send", "--room", "keep", "--user", "ann", f"m{i}")
        sub = subprocess.Popen([ZRPC, "--json", "subscribe", "--room", "keep", "--user", "sub", "--since-id", "0"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        got: list[int] = []
        stream = sub.stdout
        assert stream is not None

        def read() -> None:
            for line in stream:
                e = json.loads(line)
                if e.get("type") == "message":
                    got.append(e["message"]["id"])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: len(got) >= 5, what="replay before the restart")
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0
        second = start_broker(tmp_path, "--listen", address, app=None, name="b2").wait_ready()
        for i in range(6, 11):
            zrpc(env, "send", "--room", "keep", "--user", "ann", f"m{i}")
        try:
            wait_for(lambda: len(got) >= 10, timeout=30, what="messages after the restart")
        except AssertionError:
            sub.kill()
            raise AssertionError(f"got {got}; subscriber stderr:\n{sub.stderr.read() if sub.stderr else ''}") from None
        sub.send_signal(signal.SIGINT)
        sub.wait(10)
        reader.join(5)
        assert got == list(range(1, 11))
    finally:
        if sub is not None:
            sub.kill()
        first.stop()
        if second is not None:
            second.stop()
