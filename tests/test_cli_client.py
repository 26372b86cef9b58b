"""The ``zrpc`` client CLI and :class:`zrpc.chat_client.ChatClient`.

The CLI runs in-process through click's ``CliRunner`` against a real
:class:`zrpc.Server` (TLS on 127.0.0.1, port 0, development certificates under
the test's ``ZRPC_HOME``) serving the chat service plus a few test services.
The server lives on its own thread and event loop and is always stopped by the
fixture's finalizer. Nothing sleeps to synchronise: tests poll a condition
with a deadline, or wait on an event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import pathlib
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop
from click.testing import CliRunner, Result
from conftest import make_echo_service

import zrpc
from cli.client_cmd import EXIT_CODES, TimeParam, main
from cli.output import from_json, jsonable
from procs import eventually as poll_until
from workers.chat.service import ChatConfig, ChatService
from zrpc import Status
from zrpc.chat import ChatResponse, Message, ResponseType, SubscribeRequest
from zrpc.chat_client import Backoff, ChatClient
from zrpc.dispatch import Dispatcher
from zrpc.service import Method
from zrpc.testing import connect_in_memory

T = 20.0  # safety deadline of any single wait (never reached when the code is right)


# ------------------------------------------------------------------ helpers


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return uvloop.run(coro)


#: Poll a condition (sync or async) with this file's timeout.
eventually = eventually_async = functools.partial(poll_until, timeout=T, interval=0.01)


def extra_services() -> list[zrpc.Service]:
    """Test-only methods: the four kinds echoing plain maps, a call that never answers,
    and one that returns bytes."""
    echo = make_echo_service("Echo")  # the four kinds, shared with the framework tests

    slow = zrpc.Service("Slow")

    @slow.unary("Wait", request=dict, response=dict)
    async def wait(request: Any, ctx: zrpc.RequestContext) -> Any:
        await asyncio.Event().wait()  # until the deadline cancels it

    binary = zrpc.Service("Bin")

    @binary.unary("Get", request=dict, response=dict)
    async def get(request: Any, ctx: zrpc.RequestContext) -> Any:
        return {"raw": b"\xff\x00\x01", "text": b"hi", "n": 1}

    return [echo, slow, binary]


class ServerThread:
    """A zrpc.Server with the chat service on its own thread and event loop."""

    def __init__(self, data_dir: pathlib.Path, port: int = 0, *,
                 authenticator: Any = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.authenticator = authenticator
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: zrpc.Server | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="zrpc-test-server", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(T):
            raise AssertionError("the test server did not start")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        try:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            chat = ChatService(ChatConfig(data_dir=str(self.data_dir)))
            server = zrpc.Server(zrpc.ServerConfig(shutdown_grace_ms=0),
                                 authenticator=self.authenticator)
            server.add_service(chat.build())
            for svc in extra_services():
                server.add_service(svc)
            server.bind(f"127.0.0.1:{self.port}", zrpc.TlsConfig.development())
            (_, self.port), *_ = await server.start()
            self.server = server
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.shutdown(grace=0)  # every stream ends (UNAVAILABLE), connections close
            await chat.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop and return its result."""
        assert self.loop is not None
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def do() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(do)
        return fut.result(T)

    def stop(self) -> None:
        if self._thread.is_alive() and self.loop is not None and self._stop is not None:
            try:
                self.loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop is already closed
                pass
        if self._thread.ident is not None:
            self._thread.join(T)
            assert not self._thread.is_alive(), "the test server did not stop"


class Background:
    """An event loop on a thread: acts while a blocking ``CliRunner.invoke`` runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="zrpc-test-bg",
                                        daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(T)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(T)
        self.loop.close()


@pytest.fixture
def home(_isolated_zrpc_home: pathlib.Path) -> pathlib.Path:
    return _isolated_zrpc_home


@pytest.fixture
def server(tmp_path: pathlib.Path, home: pathlib.Path) -> Iterator[ServerThread]:
    srv = ServerThread(tmp_path / "data")
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture
def background() -> Iterator[Background]:
    bg = Background()
    try:
        yield bg
    finally:
        bg.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ISOLATED_ENV = ("ZRPC_TOKEN", "ZRPC_CA", "ZRPC_CLIENT_CERT", "ZRPC_CLIENT_KEY", "ZRPC_INSECURE",
                "ZRPC_TIMEOUT", "ZRPC_USER", "ZRPC_ROOM")


def cli(home: pathlib.Path, address: str | None, *args: str, input: str | None = None,
        expect: int | None = 0, env: dict[str, str] | None = None,
        watchdog: float | None = None) -> Result:
    """Invoke ``zrpc ARGS`` in-process; check the exit code (None: any).

    ``watchdog``: for commands that wait on something another thread does (subscribe):
    after that many seconds the command gets a SIGINT, as from Ctrl-C, so a test whose
    awaited events never come fails on its assertions instead of hanging.
    """
    full_env: dict[str, str | None] = dict.fromkeys(ISOLATED_ENV)
    full_env["ZRPC_HOME"] = str(home)
    full_env["ZRPC_SERVER"] = address
    full_env.update(env or {})
    timer = None
    if watchdog is not None:
        timer = threading.Timer(watchdog, os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
    try:
        result = CliRunner().invoke(main, list(args), input=input, env=full_env)
    finally:
        if timer is not None:
            timer.cancel()
    if expect is not None and result.exit_code != expect:
        raise AssertionError(
            f"zrpc {' '.join(args)}: exit {result.exit_code}, expected {expect}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}\n"
            f"--- exception\n{result.exc_info if result.exception else None}")
    return result


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def chat_client(srv: ServerThread, **kw: Any) -> ChatClient:
    return await ChatClient.connect(srv.address, zrpc.TlsConfig.development(), **kw)


# ------------------------------------------------------------------ usage and pure helpers


@pytest.mark.parametrize("args", [
    ["send", "--user", "u", "hi"],                                    # missing --room
    ["send", "--room", "r", "--user", "u"],                           # missing TEXT
    ["send", "-r", "r", "-u", "u", "  "],                             # empty TEXT
    ["subscribe", "-r", "r", "-u", "u", "--since-id", "1", "--since", "5"],
    ["subscribe", "-r", "r", "-u", "u", "--since", "not a time"],
    ["subscribe", "-r", "r", "-u", "u", "--count", "0"],
    ["subscribe", "-r", "r", "-u", "u", "--since-id", "-3"],
    ["--server", ":99999", "health"],
    ["--server", "localhost:0", "health"],
    ["--server", "localhost", "health"],                              # no port
    ["--server", "https://localhost:8443", "health"],
    ["--server", "localhost:http", "health"],
    ["--server", "::1:8443", "health"],                               # IPv6 without brackets
    ["health", "--server", "localhost:65536"],                        # after the command too
    ["send", "-r", "r", "-u", "u", "--insecure", "--ca", __file__, "hi"],
    ["--insecure", "health", "--ca", __file__],                       # mixed places still checked
    ["--timeout", "-1", "health"],
    ["--timeout", "0", "health"],
    ["--insecure", "--ca", __file__, "health"],
    ["--key", __file__, "health"],
    ["call", "NoSlash"],
    ["call", "Echo/Say", "{not json"],
    ["call", "--kind", "weird", "Echo/Say", "{}"],
    ["batch", "-r", "r", "-u", "u", "/nonexistent/messages.txt"],
    ["who"],
    ["no-such-command"],
])
def test_usage_errors_exit_2_without_connecting(home: pathlib.Path, args: list[str]) -> None:
    # The address is a closed port: had the command tried to connect, it would exit 3.
    result = cli(home, f"127.0.0.1:{closed_port()}", *args, expect=2)
    assert "Error" in result.stderr or "error" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", [None, "send", "batch", "subscribe", "chat", "who", "call",
                                     "list", "health"])
def test_every_command_has_help(home: pathlib.Path, command: str | None) -> None:
    args = [command, "--help"] if command else ["--help"]
    result = cli(home, "localhost:1", *args)
    assert "Usage:" in result.stdout
    assert len(result.stdout.splitlines()) > 3


def test_time_param_accepts_iso_and_epoch_ms() -> None:
    p = TimeParam()
    assert p.convert("1500", None, None) == 1500
    assert p.convert("1970-01-01T00:00:01Z", None, None) == 1000
    assert p.convert("1970-01-01T00:00:02+00:00", None, None) == 2000
    naive = p.convert("2024-05-01T12:00:00", None, None)
    assert naive == int(time.mktime((2024, 5, 1, 12, 0, 0, 0, 0, -1)) * 1000)


def test_json_helpers_mark_binary_and_round_trip() -> None:
    msg = Message(id=3, user="ada", content="hi", timestamp=7, room="r", idempotency_key="k")
    assert jsonable(msg) == {"id": 3, "user": "ada", "content": "hi", "timestamp": 7, "room": "r",
                             "idempotency_key": "k"}
    assert jsonable(ChatResponse(type=ResponseType.ack))["type"] == "ack"
    out = jsonable({"a": b"text", "b": b"\xff\xfe", 1: [b"x"]})
    assert out == {"a": "text", "b": {"$base64": "//4="}, "1": ["x"]}
    assert from_json({"b": {"$base64": "//4="}, "c": [{"$base64": "eA=="}]}) == {"b": b"\xff\xfe",
                                                                               "c": [b"x"]}
    with pytest.raises(ValueError):
        from_json({"$base64": "not base64!"})


def test_exit_code_table() -> None:
    assert EXIT_CODES[Status.UNAVAILABLE] == 3
    assert EXIT_CODES[Status.UNAUTHENTICATED] == EXIT_CODES[Status.PERMISSION_DENIED] == 4
    assert EXIT_CODES[Status.INVALID_ARGUMENT] == 2
    assert EXIT_CODES[Status.DEADLINE_EXCEEDED] == 5


# ------------------------------------------------------------------ unreachable / errors


@pytest.mark.parametrize("args", [
    ["health"],
    ["list"],
    ["send", "-r", "r", "-u", "u", "hello"],
    ["subscribe", "-r", "r", "-u", "u", "--count", "1"],
    ["call", "Echo/Say", "{}"],
    ["chat", "-r", "r", "-u", "u"],
])
def test_unreachable_server_exits_3(home: pathlib.Path, args: list[str]) -> None:
    result = cli(home, f"127.0.0.1:{closed_port()}", *args, input="", expect=3)
    assert result.stderr.startswith("error: UNAVAILABLE: ")
    assert "cannot connect" in result.stderr
    assert result.stdout == ""


def test_server_side_invalid_argument_exits_2(server: ServerThread, home: pathlib.Path) -> None:
    result = cli(home, server.address, "send", "-r", "lobby", "-u", "", "hi", expect=2)
    assert result.stderr == "error: INVALID_ARGUMENT: user must not be empty\n"


def test_deadline_exceeded_exits_5(server: ServerThread, home: pathlib.Path) -> None:
    result = cli(home, server.address, "--timeout", "0.2", "call", "Slow/Wait", "{}", expect=5)
    assert result.stderr.startswith("error: DEADLINE_EXCEEDED: ")


def test_unknown_method_exits_1(server: ServerThread, home: pathlib.Path) -> None:
    result = cli(home, server.address, "call", "Nope/Nothing", "{}", expect=1)
    assert result.stderr.startswith("error: UNIMPLEMENTED: ")


def test_token_is_sent_and_refusal_exits_4(tmp_path: pathlib.Path, home: pathlib.Path) -> None:
    def authenticate(hello: dict[str, Any], peer: Any) -> tuple[str | None, dict[str, Any]]:
        if hello.get("token") != "s3cret":
            raise zrpc.RpcError(Status.UNAUTHENTICATED, "bad or missing token")
        return "tester", {}

    srv = ServerThread(tmp_path / "data", authenticator=authenticate)
    try:
        srv.start()
        refused = cli(home, srv.address, "health", expect=4)
        assert refused.stderr.startswith("error: UNAUTHENTICATED: ")
        cli(home, srv.address, "--token", "wrong", "health", expect=4)
        assert cli(home, srv.address, "--token", "s3cret", "health").stdout == "SERVING\n"
        assert cli(home, srv.address, "health", env={"ZRPC_TOKEN": "s3cret"}).stdout == "SERVING\n"
        # The server replaces the user by the authenticated identity.
        sent = cli(home, srv.address, "--json", "--token", "s3cret", "send", "-r", "r", "-u",
                   "whoever", "hi")
        assert json.loads(sent.stdout)["user"] == "tester"
    finally:
        srv.stop()


def test_wrong_ca_is_unavailable(server: ServerThread, home: pathlib.Path,
                                 tmp_path: pathlib.Path) -> None:
    other = tmp_path / "other-home"
    zrpc.TlsConfig.development(other)  # a different development CA
    ca = other / "tls" / "dev-ca.crt"
    assert ca.exists()
    result = cli(home, server.address, "--ca", str(ca), "health", expect=3)
    assert "certificate" in result.stderr.lower()


# ------------------------------------------------------------------ chat commands


def test_send_prints_the_ack(server: ServerThread, home: pathlib.Path) -> None:
    human = cli(home, server.address, "send", "-r", "lobby", "-u", "ada", "hello", "world")
    assert human.stdout.startswith("sent #1 to lobby at ")
    assert "\x1b[" not in human.stdout  # no colour when stdout is not a terminal

    raw = cli(home, server.address, "--json", "send", "--room", "lobby", "--user", "ada", "again")
    (stored,) = json_lines(raw.stdout)
    assert set(stored) == {"id", "user", "content", "timestamp", "room", "idempotency_key"}
    assert len(stored["idempotency_key"]) == 22  # zrpc send keys every message
    assert stored["id"] == 2 and stored["content"] == "again" and stored["user"] == "ada"
    assert stored["room"] == "lobby" and stored["timestamp"] > 0


def test_batch_from_stdin_and_file(server: ServerThread, home: pathlib.Path,
                                   tmp_path: pathlib.Path) -> None:
    lines = "one\n\n{\"user\": \"bob\", \"content\": \"two\"}\n{\"room\": \"side\", \"content\": \"x\"}\n" \
            "{not an override}\nthree\n"
    human = cli(home, server.address, "batch", "-r", "lobby", "-u", "ada", input=lines)
    assert human.stdout == "sent 5 message(s), 29 character(s), from ada, bob\n"

    path = tmp_path / "msgs.txt"
    path.write_text("four\nfive é\n", encoding="utf-8")
    raw = cli(home, server.address, "--json", "batch", "-r", "lobby", "-u", "cy", str(path))
    (summary,) = json_lines(raw.stdout)
    assert set(summary) == {"total_messages", "total_characters", "users", "timestamp"}
    assert summary["total_messages"] == 2 and summary["total_characters"] == 10
    assert summary["users"] == ["cy"] and summary["timestamp"] > 0

    events = json_lines(cli(home, server.address, "--json", "subscribe", "-r", "lobby", "-u", "w",
                            "--since-id", "0", "--count", "6").stdout)
    got = [(e["message"]["user"], e["message"]["content"]) for e in events]
    assert got == [("ada", "one"), ("bob", "two"), ("ada", "{not an override}"),
                   ("ada", "three"), ("cy", "four"), ("cy", "five é")]
    side = json_lines(cli(home, server.address, "--json", "subscribe", "-r", "side", "-u", "w",
                          "--since-id", "0", "--count", "1").stdout)
    assert side[0]["message"]["content"] == "x" and side[0]["message"]["user"] == "ada"


def test_batch_rejects_bad_override(server: ServerThread, home: pathlib.Path) -> None:
    result = cli(home, server.address, "batch", "-r", "lobby", "-u", "ada",
                 input='ok\n{"user": 5}\n', expect=2)
    assert result.stderr == "error: INVALID_ARGUMENT: stdin line 2: 'user' must be a string\n"


def test_subscribe_replays_then_marks_joins(server: ServerThread, home: pathlib.Path) -> None:
    for word in ("alpha", "beta", "gamma"):
        cli(home, server.address, "send", "-r", "hist", "-u", "ada", word)

    out = cli(home, server.address, "subscribe", "-r", "hist", "-u", "bob", "--since-id", "0",
              "--count", "4").stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in out[:3]] == ["#1 ada: alpha", "#2 ada: beta",
                                                           "#3 ada: gamma"]
    assert out[3] == "--> bob joined"

    events = json_lines(cli(home, server.address, "--json", "subscribe", "-r", "hist", "-u", "bob",
                            "--since-id", "2", "--count", "2").stdout)
    assert events[0]["type"] == "message" and events[0]["message"]["id"] == 3
    assert set(events[0]) == {"type", "message", "user_joined", "user_left", "error_message", "seq"}
    assert events[1]["type"] == "user_joined" and events[1]["user_joined"] == "bob"

    # --since TIME (epoch ms, then ISO): messages strictly after it
    t2 = json_lines(cli(home, server.address, "--json", "subscribe", "-r", "hist", "-u", "bob",
                        "--since-id", "0", "--count", "3").stdout)[0]["message"]["timestamp"]
    after = json_lines(cli(home, server.address, "--json", "subscribe", "-r", "hist", "-u", "bob",
                           "--since", str(t2 - 1), "--count", "1").stdout)
    assert after[0]["message"]["id"] == 1
    iso = cli(home, server.address, "subscribe", "-r", "hist", "-u", "bob",
              "--since", "1970-01-01T00:00:00Z", "--count", "1").stdout
    assert "#1 ada: alpha" in iso


def test_subscribe_prints_live_events(server: ServerThread, home: pathlib.Path,
                                      background: Background) -> None:
    async def when_bob_listens_send() -> None:
        async with await chat_client(server) as chat:
            await eventually_async(lambda: _present(chat, "live", "bob"), what="bob subscribed")
            await chat.send("live", "ada", "first")
            await chat.send("live", "ada", "second")

    sender = background.submit(when_bob_listens_send())
    result = cli(home, server.address, "subscribe", "-r", "live", "-u", "bob", "--count", "3",
                 watchdog=T)
    sender.result(T)
    lines = result.stdout.splitlines()
    assert lines[0] == "--> bob joined"
    assert lines[1].endswith("#1 ada: first") and lines[2].endswith("#2 ada: second")


async def _present(chat: ChatClient, room: str, name: str) -> bool:
    return any(u.name == name for u in await chat.who(room))


def test_subscribe_cli_resumes_across_server_restart(tmp_path: pathlib.Path, home: pathlib.Path,
                                                     background: Background) -> None:
    """The CLI prints every message exactly once although the server restarts mid-stream."""
    servers = [ServerThread(tmp_path / "data").start()]
    try:
        cli(home, servers[0].address, "send", "-r", "r", "-u", "ada", "m1")
        cli(home, servers[0].address, "send", "-r", "r", "-u", "ada", "m2")

        async def restart_when_bob_listens() -> None:
            async with await chat_client(servers[0]) as chat:
                await eventually_async(lambda: _present(chat, "r", "bob"), what="bob subscribed")
            await asyncio.to_thread(servers[0].stop)
            servers.append(await asyncio.to_thread(
                ServerThread(tmp_path / "data", port=servers[0].port).start))
            async with await chat_client(servers[1]) as chat:
                await chat.send("r", "ada", "m3")
                await chat.send("r", "ada", "m4")

        actor = background.submit(restart_when_bob_listens())
        result = cli(home, servers[0].address, "subscribe", "-r", "r", "-u", "bob",
                     "--since-id", "0", "--count", "6", watchdog=T)
        actor.result(T)
        lines = result.stdout.splitlines()
        messages = [line.split(" ", 1)[1] for line in lines if " #" in line]
        assert messages == ["#1 ada: m1", "#2 ada: m2", "#3 ada: m3", "#4 ada: m4"]
        assert lines.count("--> bob joined") == 2  # once per connection
        assert "resuming in" in result.stderr
    finally:
        for srv in servers:
            srv.stop()


def test_who_lists_present_users(server: ServerThread, home: pathlib.Path,
                                 background: Background) -> None:
    assert cli(home, server.address, "who", "-r", "empty").stdout == "nobody in empty\n"
    assert cli(home, server.address, "--json", "who", "-r", "empty").stdout == ""

    joined = threading.Event()
    leave = asyncio.Event()

    async def stay_joined() -> None:
        async with await chat_client(server) as chat, chat.join("den", "zoe") as session:
            await session.send("hello")
            joined.set()
            await leave.wait()

    stay = background.submit(stay_joined())
    try:
        assert joined.wait(T), "zoe did not join"
        human = cli(home, server.address, "who", "--room", "den").stdout
        assert human.startswith("zoe  joined ") and human.endswith("  1 message(s)\n")
        (user,) = json_lines(cli(home, server.address, "--json", "who", "-r", "den").stdout)
        assert user["name"] == "zoe" and user["message_count"] == 1 and user["joined_at"] > 0
    finally:
        background.loop.call_soon_threadsafe(leave.set)
        stay.result(T)


def test_chat_without_terminal_sends_lines_and_prints_events(server: ServerThread,
                                                             home: pathlib.Path) -> None:
    result = cli(home, server.address, "chat", "-r", "pipe", "-u", "carl",
                 input="hello\n\n/who\n//slash\nworld\n")
    lines = result.stdout.splitlines()
    assert lines[0] == "--> carl joined"
    said = [line.split(" ", 2)[2] for line in lines if " #" in line]
    assert said == ["carl: hello", "carl: /slash", "carl: world"]
    assert any(line.startswith("carl  joined ") for line in lines)  # the /who answer
    assert "joined" in lines[0]

    events = json_lines(cli(home, server.address, "--json", "chat", "-r", "pipe", "-u", "dora",
                            input="hi there\n").stdout)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["user_joined", "message"]
    assert events[1]["message"]["content"] == "hi there" and events[1]["message"]["id"] == 4

    # Everything was stored: a later subscriber replays it.
    replay = json_lines(cli(home, server.address, "--json", "subscribe", "-r", "pipe", "-u", "w",
                            "--since-id", "0", "--count", "4").stdout)
    assert [e["message"]["content"] for e in replay] == ["hello", "/slash", "world", "hi there"]


def test_chat_refused_line_is_reported_and_the_session_goes_on(server: ServerThread,
                                                               home: pathlib.Path) -> None:
    result = cli(home, server.address, "chat", "-r", "refuse", "-u", "carl",
                 input="before\n" + "x" * 20000 + "\nafter\n", expect=2)
    assert "error: INVALID_ARGUMENT: content is 20000 bytes long" in result.stderr
    said = [line.split(" ", 2)[2] for line in result.stdout.splitlines() if " #" in line]
    assert said == ["carl: before", "carl: after"]  # the line after the refused one was sent


def test_chat_shows_who_is_already_in_the_room(server: ServerThread, home: pathlib.Path,
                                               background: Background) -> None:
    joined = threading.Event()
    leave = asyncio.Event()

    async def stay() -> None:
        async with await chat_client(server) as chat, chat.join("here", "olga"):
            joined.set()
            await leave.wait()

    staying = background.submit(stay())
    try:
        assert joined.wait(T), "olga did not join"
        result = cli(home, server.address, "chat", "-r", "here", "-u", "carl", input="")
        assert "joined here as carl; here now: olga, carl (you)" in result.stderr
    finally:
        background.loop.call_soon_threadsafe(leave.set)
        staying.result(T)


def test_call_with_an_idempotency_key_twice_prints_the_same_id(server: ServerThread,
                                                              home: pathlib.Path) -> None:
    request = '{"room": "idem", "user": "ann", "content": "once", "idempotency_key": "k1"}'
    first = json_lines(cli(home, server.address, "call", "Chat/SendMessage", request).stdout)
    again = json_lines(cli(home, server.address, "call", "Chat/SendMessage", request).stdout)
    assert first == again and first[0]["message"]["id"] == 1
    other = request.replace("k1", "k2")
    assert json_lines(cli(home, server.address, "call", "Chat/SendMessage",
                          other).stdout)[0]["message"]["id"] == 2


@pytest.mark.skipif(shutil.which("zrpc", path=os.path.dirname(sys.executable)) is None,
                    reason="the zrpc console script is not installed")
def test_chat_interactive_terminal(server: ServerThread, home: pathlib.Path) -> None:
    pytest.importorskip("prompt_toolkit")
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "ZRPC_HOME": str(home), "ZRPC_SERVER": server.address, "TERM": "xterm",
           "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(os.path.join(os.path.dirname(sys.executable), "zrpc"),
                          ["chat", "-r", "tty", "-u", "tina"], env=env, encoding="utf-8",
                          timeout=T, dimensions=(24, 120))
    try:
        child.expect("tty>")
        child.sendline("hello tty")
        child.expect(r"tina\S*: hello tty")
        child.send("half-typed")  # while a message from someone else arrives
        cli(home, server.address, "send", "-r", "tty", "-u", "zed", "interrupting")
        child.expect(r"zed\S*: interrupting")
        child.expect("half-typed")  # the input line is redrawn below the message
        child.sendline("")
        child.expect(r"tina\S*: half-typed")
        child.sendline("/who")
        child.expect(r"2 message\(s\)")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# ------------------------------------------------------------------ generic commands


def test_list_methods(server: ServerThread, home: pathlib.Path) -> None:
    lines = cli(home, server.address, "list").stdout.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines}
    assert rows["Chat/SendMessage"] == ["unary", "room"]
    assert rows["Chat/SendMessageBatch"] == ["client_stream", "room"]
    assert rows["Chat/SubscribeToRoom"] == ["server_stream", "room"]
    assert rows["Chat/JoinChat"] == ["bidi", "room"]
    assert rows["Health/Check"] == ["unary", "-"]
    assert lines == sorted(lines)

    methods = json_lines(cli(home, server.address, "--json", "list").stdout)
    by_name = {m["name"]: m for m in methods}
    assert by_name["Chat/ListUsers"] == {"name": "Chat/ListUsers", "kind": "unary",
                                         "shard_key": "room", "request": "ListUsersRequest",
                                         "response": "ListUsersResponse"}
    assert by_name["Echo/Chat"]["kind"] == "bidi" and by_name["Echo/Chat"]["shard_key"] is None


def test_health(server: ServerThread, home: pathlib.Path) -> None:
    assert cli(home, server.address, "health").stdout == "SERVING\n"
    assert json_lines(cli(home, server.address, "--json", "health").stdout) == [{"status": "SERVING"}]

    async def not_serving(request: Any, ctx: zrpc.RequestContext) -> Any:
        return {"status": "NOT_SERVING"}

    def swap() -> None:
        assert server.server is not None
        methods = server.server.dispatcher.methods
        methods["Health/Check"] = Method(methods["Health/Check"].spec, not_serving)

    server.call(swap)
    result = cli(home, server.address, "health", expect=1)
    assert result.stdout == "NOT_SERVING\n"


def test_call_every_kind(server: ServerThread, home: pathlib.Path) -> None:
    addr = server.address
    assert json_lines(cli(home, addr, "call", "Echo/Say", '{"text": "hi", "n": [1, 2]}').stdout) \
        == [{"text": "hi", "n": [1, 2]}]
    assert json_lines(cli(home, addr, "call", "Echo/Say", input='{"from": "stdin"}\n').stdout) \
        == [{"from": "stdin"}]
    assert json_lines(cli(home, addr, "call", "Echo/Say", input="").stdout) == [{}]
    assert json_lines(cli(home, addr, "call", "Echo/Repeat", '{"n": 3}').stdout) \
        == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert json_lines(cli(home, addr, "call", "Echo/Collect", input='{"a": 1}\n\n{"b": 2}\n').stdout) \
        == [{"items": [{"a": 1}, {"b": 2}]}]
    assert json_lines(cli(home, addr, "call", "Echo/Collect", input="").stdout) == [{"items": []}]
    assert json_lines(cli(home, addr, "call", "Echo/Chat", input='{"x": 1}\n{"x": 2}\n').stdout) \
        == [{"x": 1}, {"x": 2}]
    assert json_lines(cli(home, addr, "call", "--kind", "unary", "Echo/Say", "[1]").stdout) == [[1]]
    # Typed methods take and return their dataclasses' fields.
    listed = json_lines(cli(home, addr, "call", "Chat/ListUsers", '{"room": "nobody-here"}').stdout)
    assert listed == [{"room": "nobody-here", "users": []}]


def test_call_bytes_and_bad_input(server: ServerThread, home: pathlib.Path) -> None:
    addr = server.address
    assert json_lines(cli(home, addr, "call", "Bin/Get", "{}").stdout) \
        == [{"raw": {"$base64": "/wAB"}, "text": "hi", "n": 1}]
    assert json_lines(cli(home, addr, "call", "Echo/Say", '{"b": {"$base64": "/wAB"}}').stdout) \
        == [{"b": {"$base64": "/wAB"}}]
    bad = cli(home, addr, "call", "Echo/Collect", input='{"ok": 1}\nnope\n', expect=2)
    assert bad.stderr.startswith("error: INVALID_ARGUMENT: stdin line 2: not valid JSON")
    bad = cli(home, addr, "call", "Echo/Chat", input='{"ok": 1}\n{oops\n', expect=2)
    assert bad.stderr.startswith("error: INVALID_ARGUMENT: stdin line 2: not valid JSON")
    wrong = cli(home, addr, "call", "Chat/SendMessage", '{"room": 5}', expect=2)
    assert wrong.stderr.startswith("error: INVALID_ARGUMENT: ")


# ------------------------------------------------------------------ ChatClient


def test_chat_client_calls(server: ServerThread) -> None:
    async def scenario() -> None:
        async with await chat_client(server) as chat:
            stored = await chat.send("api", "ann", "first")
            assert (stored.id, stored.user, stored.content, stored.room) == (1, "ann", "first", "api")
            assert stored.timestamp > 0

            async def more() -> Any:
                for i in range(3):
                    yield Message(user="bob", content=f"m{i}", room="api")

            summary = await chat.batch(more())
            assert (summary.total_messages, summary.total_characters, summary.users) == (3, 6, ["bob"])
            summary = await chat.batch([Message(user="cy", content="xyz", room="api")])
            assert summary.total_messages == 1

            with pytest.raises(zrpc.RpcError) as info:
                await chat.batch([Message(user="cy", content="ok", room="api"),
                                  Message(user="", content="no user", room="api")])
            assert info.value.status is Status.INVALID_ARGUMENT

            async with chat.join("api", "ann") as session:
                assert session.joined is not None and session.joined.type is ResponseType.ack
                mine = await session.send("from the stream")
                assert mine.id == 7 and mine.user == "ann"
                seen = []
                async for event in session:
                    seen.append(event)
                    if event.type is ResponseType.message:
                        break
                assert seen[0].type is ResponseType.user_joined and seen[0].user_joined == "ann"
                assert seen[-1].message == mine
                with pytest.raises(zrpc.RpcError) as info:
                    await session.send("x" * 20000)
                assert info.value.status is Status.INVALID_ARGUMENT
                assert [u.name for u in await chat.who("api")] == ["ann"]
                assert (await session.send("still open")).id == 8
            assert session.closed
            assert await chat.who("api") == []

    run(scenario())


def test_chat_client_subscribe_resumes_after_restart(tmp_path: pathlib.Path,
                                                     home: pathlib.Path) -> None:
    """The server goes away mid-stream and comes back on the same port and data dir:
    the subscription reconnects, replays what it missed and repeats nothing."""
    first = ServerThread(tmp_path / "data").start()
    servers = [first]

    async def scenario() -> None:
        gate = asyncio.Event()
        gate.set()
        attempts: list[str] = []

        async def connect() -> zrpc.Client:
            await gate.wait()
            client = zrpc.Client()
            await client.connect(first.address, zrpc.TlsConfig.development())
            return client

        chat = ChatClient(await connect(), connect)
        sub = chat.subscribe("room", "watcher", since_id=0,
                             reconnect=Backoff(initial=0.01, maximum=0.2),
                             on_retry=lambda n, d, e: attempts.append(e.status.name))
        ids: list[int] = []
        events: list[ChatResponse] = []

        async def consume() -> None:
            async for event in sub:
                events.append(event)
                if event.type is ResponseType.message:
                    assert event.message is not None
                    ids.append(event.message.id)
                    if len(ids) == 9:
                        return

        consumer = asyncio.get_running_loop().create_task(consume())
        try:
            async with await chat_client(first) as sender:
                for i in range(1, 4):
                    await sender.send("room", "ada", f"m{i}")
            await eventually(lambda: len(ids) == 3 or consumer.done(), what="3 live messages")

            gate.clear()  # hold the reconnect until messages were sent to the new server
            await asyncio.to_thread(first.stop)
            await eventually(lambda: attempts or consumer.done(), what="the drop to be noticed")
            second = await asyncio.to_thread(
                ServerThread(tmp_path / "data", port=first.port).start)
            servers.append(second)
            async with await chat_client(second) as sender:
                for i in range(4, 7):
                    await sender.send("room", "ada", f"m{i}")  # while the subscriber is away
            gate.set()
            await eventually(lambda: len(ids) >= 6 or consumer.done(), what="the replay")
            async with await chat_client(second) as sender:
                for i in range(7, 10):
                    await sender.send("room", "ada", f"m{i}")  # live again
            async with asyncio.timeout(T):
                await consumer
        finally:
            consumer.cancel()
            await sub.aclose()
            await chat.close()
        assert ids == list(range(1, 10))
        assert sub.resumes >= 1 and chat.reconnects >= 1
        assert attempts and set(attempts) == {"UNAVAILABLE"}
        assert sub.last_id == 9

    try:
        run(scenario())
    finally:
        for srv in servers:
            srv.stop()


def test_chat_client_subscribe_skips_duplicates_and_reconnects() -> None:
    """A server that replays too much and drops streams and connections: the caller
    still sees every message once, in order."""
    requests: list[SubscribeRequest] = []
    svc = zrpc.Service("Chat")

    def msg(i: int) -> ChatResponse:
        return ChatResponse.message_response(Message(id=i, user="u", content=f"m{i}", timestamp=i,
                                                     room="r"))

    @svc.server_stream("SubscribeToRoom", request=SubscribeRequest, response=ChatResponse)
    async def subscribe(request: SubscribeRequest, call: zrpc.ServerCall) -> None:
        requests.append(request)
        n = len(requests)
        if n == 1:
            for i in (1, 2, 3):
                await call.send(msg(i))
            raise zrpc.RpcError(Status.ABORTED, "events lost; resume from your last id")
        if n == 2:
            await call.send(ChatResponse.user_joined_response("u"))
            for i in (2, 3, 4, 5):  # 2 and 3 again
                await call.send(msg(i))
            raise zrpc.RpcError(Status.RESOURCE_EXHAUSTED, "too slow")
        if n == 3:
            for i in (5, 6):
                await call.send(msg(i))
            call.session.conn.close(Status.UNAVAILABLE, "going down")
            call.session.terminate(Status.UNAVAILABLE, "connection dropped")
            return
        for i in (4, 6, 7):
            await call.send(msg(i))
        # then the stream ends normally: the subscription is over

    dispatcher = Dispatcher()
    dispatcher.add_service(svc)

    async def scenario() -> None:
        connections = 0

        async def connect() -> zrpc.Client:
            nonlocal connections
            connections += 1
            return await connect_in_memory(dispatcher)

        chat = ChatClient(await connect(), connect)
        sub = chat.subscribe("r", "me", reconnect=Backoff(initial=0.001, maximum=0.01))
        async with asyncio.timeout(T):
            got = [e async for e in sub]
        await chat.close()
        ids = [e.message.id for e in got if e.message is not None]
        assert ids == [1, 2, 3, 4, 5, 6, 7]
        assert [e.type for e in got].count(ResponseType.user_joined) == 1
        assert [r.since_id for r in requests] == [None, 3, 5, 6]
        assert requests[0].since_timestamp is None
        assert sub.resumes == 3 and connections == 2 and chat.reconnects == 1

    run(scenario())


def test_chat_client_subscribe_gives_up(tmp_path: pathlib.Path, home: pathlib.Path) -> None:
    """With reconnect=False (or after max_attempts) a lost connection raises."""
    srv = ServerThread(tmp_path / "data").start()

    async def scenario(reconnect: bool | Backoff) -> zrpc.RpcError:
        chat = await chat_client(srv)
        try:
            sub = chat.subscribe("r", "me", reconnect=reconnect)
            async with sub:
                first = await sub.__anext__()  # our own join: the stream is attached
                assert first.type is ResponseType.user_joined
                await asyncio.to_thread(srv.stop)
                with pytest.raises(zrpc.RpcError) as info:
                    async with asyncio.timeout(T):
                        await sub.__anext__()
                return info.value
        finally:
            await chat.close()

    try:
        assert run(scenario(False)).status is Status.UNAVAILABLE
        srv = ServerThread(tmp_path / "data", port=srv.port).start()
        assert run(scenario(Backoff(initial=0.001, max_attempts=3))).status is Status.UNAVAILABLE
    finally:
        srv.stop()


def test_chat_client_reconnects_lazily_for_new_calls(tmp_path: pathlib.Path,
                                                     home: pathlib.Path) -> None:
    srv = ServerThread(tmp_path / "data").start()
    servers = [srv]

    async def scenario() -> None:
        async with await chat_client(srv) as chat:
            assert (await chat.send("lazy", "ann", "one")).id == 1
            await asyncio.to_thread(srv.stop)
            await eventually(lambda: not _connected(chat), what="the drop to be noticed")
            with pytest.raises(zrpc.ConnectionReset):  # nobody listens on the port now:
                await chat.send("lazy", "ann", "lost", timeout=0.3)  # retried until the deadline
            assert chat.retries >= 1
            servers.append(await asyncio.to_thread(
                ServerThread(tmp_path / "data", port=srv.port).start))
            assert (await chat.send("lazy", "ann", "two")).id == 2
            assert chat.reconnects == 1
            assert await chat.who("lazy") == []

    try:
        run(scenario())
    finally:
        for s in servers:
            s.stop()


def _connected(chat: ChatClient) -> bool:
    session = chat.client.session
    return session is not None and not session.closed
