"""``zrpc``: the command-line client (chat commands plus generic calls).

Every command connects to ``--server`` (TLS trusting the system store plus the
development CA, unless ``--ca``/``--insecure``), runs, and exits with a code
derived from the call's status: 0 OK, 2 INVALID_ARGUMENT (and usage errors), 3
UNAVAILABLE (server unreachable or gone), 4 UNAUTHENTICATED /
PERMISSION_DENIED, 5 DEADLINE_EXCEEDED, 130 stopped by Ctrl-C (SIGINT), 1
anything else. Errors are printed to stderr as
``error: STATUS_NAME: message``; ``--json`` prints one JSON object per line on
stdout instead of the human format.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any

import click

import zrpc
from cli.client_options import ClientGroup, group_options
from cli.common import run_async
from cli.output import Output, format_time, from_json
from cli.token_cmd import token
from zrpc.client import Client
from zrpc.config import ClientConfig
from zrpc.status import RpcError, Status
from zrpc.tls import TlsConfig

if TYPE_CHECKING:
    from zrpc.chat import ChatResponse, Message
    from zrpc.chat_client import ChatClient, ChatSession

__all__ = ["EXIT_CODES", "exit_code", "main"]

#: Exit code per status (anything else non-OK exits 1).
EXIT_CODES: dict[Status, int] = {
    Status.OK: 0,
    Status.INVALID_ARGUMENT: 2,
    Status.UNAVAILABLE: 3,
    Status.UNAUTHENTICATED: 4,
    Status.PERMISSION_DENIED: 4,
    Status.DEADLINE_EXCEEDED: 5,
}
#: How long ``chat`` waits at end of input for its own messages to come back as events.
ECHO_WAIT_S = 5.0
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
KINDS = ("unary", "client_stream", "server_stream", "bidi")


def exit_code(status: Status) -> int:
    return EXIT_CODES.get(status, 1)


class InputError(Exception):
    """Bad input data (a JSON line, a batch line): reported as INVALID_ARGUMENT, exit 2."""


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """The group's options, shared by every command."""

    server: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False
    token: str | None = None
    timeout: float | None = None
    out: Output = field(default_factory=Output)

    def check(self) -> None:
        """Combinations the options cannot express one by one (usage errors)."""
        if self.insecure and (self.ca or self.cert or self.key):
            raise click.UsageError("--insecure (plaintext) cannot be combined with --ca/--cert/--key")
        if self.key and not self.cert:
            raise click.UsageError("--key needs --cert")

    def tls(self) -> TlsConfig:
        """Explicit files, plaintext with --insecure, else the system store plus the development CA."""
        try:
            if self.insecure:
                return TlsConfig.insecure_plaintext()
            default = TlsConfig.client()
            if self.ca or self.cert:
                ca = self.ca or default.ca_file
                return TlsConfig(cert_file=self.cert, key_file=self.key, ca_file=ca,
                                 trust_system_store=self.ca is None)
            return default
        except (ValueError, OSError) as exc:
            raise InputError(f"TLS configuration: {exc}") from None

    def client_config(self) -> ClientConfig:
        cfg = replace(ClientConfig(), token=self.token, user_agent=f"zrpc-cli/{zrpc.__version__}")
        if self.timeout is not None:
            ms = max(1, int(self.timeout * 1000))
            cfg = replace(cfg, request_timeout_ms=ms, connect_timeout_ms=ms)
        return cfg

    async def connect(self) -> Client:
        client = Client(self.client_config())
        try:
            await client.connect(self.server, self.tls())
        except ValueError as exc:  # an unusable CA bundle or certificate
            raise InputError(f"TLS configuration: {exc}") from None
        return client

    async def chat(self) -> ChatClient:
        from zrpc.chat_client import ChatClient

        try:
            return await ChatClient.connect(self.server, self.tls(), self.client_config(),
                                            timeout=self.timeout)
        except ValueError as exc:
            raise InputError(f"TLS configuration: {exc}") from None


def _settings() -> Settings:
    settings = click.get_current_context().find_object(Settings)
    if settings is None:  # a command invoked without the group (programmatic use)
        settings = Settings(server=os.environ.get("ZRPC_SERVER") or "localhost:8443")
    settings.check()
    return settings


def _run(work: Callable[[Settings], Coroutine[Any, Any, int | None]]) -> None:
    """Run ``work`` on uvloop and turn its outcome into the exit code."""
    settings = _settings()
    ctx = click.get_current_context()
    try:
        code: int | None = run_async(work(settings))
    except RpcError as exc:
        Output.error(exc)
        code = exit_code(exc.status)
    except InputError as exc:
        Output.error(str(exc), Status.INVALID_ARGUMENT.name)
        code = 2
    except KeyboardInterrupt:
        code = 130  # as shells expect of a command stopped by Ctrl-C
    except BrokenPipeError:
        with contextlib.suppress(OSError):  # the reader went away (`| head`): quietly stop
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        code = 1
    ctx.exit(code or 0)


# --------------------------------------------------------------------------- input


class LineReader:
    """Lines of a text stream, read by a daemon thread so the event loop never blocks.

    A daemon thread (not the loop's executor) so that a read blocked on a
    terminal never keeps the process alive once the command is done.
    """

    _MAX_QUEUED = 4096

    def __init__(self, stream: IO[str]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        self._slots = threading.Semaphore(self._MAX_QUEUED)
        self._stream = stream
        threading.Thread(target=self._pump, name="zrpc-input", daemon=True).start()

    def _put(self, item: str | BaseException | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody wants the rest
            return False
        return True

    def _pump(self) -> None:
        try:
            while True:
                self._slots.acquire()
                line = self._stream.readline()
                if not line:
                    break
                if not self._put(line):
                    return
        except BaseException as exc:  # surfaced to the reader (a decoding error, a closed stream)
            self._put(exc)
            return
        self._put(None)

    async def readline(self) -> str | None:
        """The next line (with its newline), None at end of input."""
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            return None
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            if isinstance(item, UnicodeDecodeError):
                raise InputError(f"input is not valid UTF-8: {item}")
            raise item
        self._slots.release()
        return item

    async def __aiter__(self) -> AsyncIterator[str]:
        while (line := await self.readline()) is not None:
            yield line


def _stdin() -> IO[str]:
    return sys.stdin


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _input_size(stream: IO[Any]) -> int | None:
    """Size in bytes of a regular file (None for pipes, terminals, in-memory streams)."""
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _parse_json(text: str, where: str) -> Any:
    try:
        return from_json(json.loads(text))
    except (json.JSONDecodeError, ValueError) as exc:
        raise InputError(f"{where}: not valid JSON: {exc}") from None


class TimeParam(click.ParamType):
    """ISO-8601 (``2024-05-01T12:00:00``, ``...Z``, a date) or epoch milliseconds -> epoch ms."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if re.fullmatch(r"\d+", text):
            return int(text)
        try:
            t = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            self.fail(f"{value!r} is neither an ISO-8601 time nor epoch milliseconds", param, ctx)
        return int(t.timestamp() * 1000)  # a naive time is local time


# --------------------------------------------------------------------------- events


def _name(who: Any) -> str:
    """A user in an event: a ``User`` or a plain name."""
    if who is None:
        return "?"
    return str(getattr(who, "name", who))


def print_event(out: Output, event: ChatResponse) -> None:
    """One chat event: ``time #id user: text``, joins/leaves marked."""
    if out.json_mode:
        out.json(event)
        return
    kind = getattr(event.type, "value", event.type)
    msg = event.message
    if kind in ("message", "ack") and msg is not None:
        stamp = out.style(f"{format_time(msg.timestamp)} #{msg.id}", dim=True)
        out.line(f"{stamp} {out.style(msg.user, fg='cyan', bold=True)}: {msg.content}")
    elif kind == "user_joined":
        out.line(out.style(f"--> {_name(event.user_joined)} joined", fg="green"))
    elif kind == "user_left":
        out.line(out.style(f"<-- {_name(event.user_left)} left", fg="yellow"))
    elif kind == "error":
        out.line(out.style(f"!! {event.error_message}", fg="red", bold=True))
    else:
        out.line(f"{kind}: {event}")


def print_users(out: Output, users: list[Any]) -> None:
    for u in users:
        if out.json_mode:
            out.json(u)
        else:
            out.line(f"{out.style(u.name, bold=True)}  joined {format_time(u.joined_at, date=True)}  "
                     f"{u.message_count} message(s)")


# --------------------------------------------------------------------------- the group


def _override(ctx: click.Context, dest: str, value: Any) -> None:
    """A global option given after the subcommand: it wins over the group's value."""
    settings = ctx.find_object(Settings)
    if settings is None:
        return
    if dest == "json_mode":
        settings.out.json_mode = bool(value)
    else:
        setattr(settings, dest, value)


@click.group(context_settings=CONTEXT, cls=ClientGroup, on_override=_override)
@group_options
@click.version_option(zrpc.__version__, "--version", "-V", prog_name="zrpc")
@click.pass_context
def main(ctx: click.Context, server: str, ca: str | None, cert: str | None, key: str | None,
         insecure: bool, token: str | None, timeout: float | None, json_mode: bool) -> None:
    """The zrpc command-line client: chat from a shell, call any method, check health.

    \b
    Examples:
      zrpc send --room lobby --user ada hello world
      zrpc subscribe --room lobby --user bob --since-id 0
      zrpc --json call Echo/Say '{"text": "hi"}'

    The options below are also accepted after the command (`zrpc send
    --server HOST:PORT ...`); there they win over the ones before it.

    Exit codes: 0 ok, 1 other error, 2 usage / INVALID_ARGUMENT, 3 UNAVAILABLE,
    4 UNAUTHENTICATED / PERMISSION_DENIED, 5 DEADLINE_EXCEEDED, 130 Ctrl-C.
    """
    ctx.obj = Settings(server=server, ca=ca, cert=cert, key=key, insecure=insecure, token=token,
                       timeout=timeout, out=Output(json_mode=json_mode, color=_isatty(sys.stdout)))


def room_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--room", "-r", required=True, envvar="ZRPC_ROOM",
                        help="Chat room [env ZRPC_ROOM].")(f)


def user_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--user", "-u", required=True, envvar="ZRPC_USER",
                        help="Your user name [env ZRPC_USER].")(f)


def _need(value: str, what: str) -> str:
    if not value.strip():
        raise click.BadParameter(f"{what} must not be empty")
    return value


# --------------------------------------------------------------------------- chat commands


@main.command()
@room_option
@user_option
@click.argument("text", nargs=-1, required=True)
def send(room: str, user: str, text: tuple[str, ...]) -> None:
    """Send one message; prints its id and time.

    TEXT is the message (several words are joined by spaces).
    """
    content = " ".join(text)
    _need(content, "TEXT")

    async def work(s: Settings) -> None:
        chat = await s.chat()
        async with chat:
            stored = await chat.send(room, user, content)
        if s.out.json_mode:
            s.out.json(stored)
        else:
            s.out.line(f"sent {s.out.style(f'#{stored.id}', bold=True)} to {stored.room} "
                       f"at {format_time(stored.timestamp, date=True)}")

    _run(work)


@contextlib.contextmanager
def _progress(size: int | None, *, on: bool) -> Iterator[Callable[[int, bool], None]]:
    """Progress of ``batch`` on stderr: a bar when the input size is known, else a count.

    Yields ``advance(nbytes, is_message)``; draws nothing when ``on`` is false
    (stderr is not a terminal, or ``--json``).
    """
    if not on:
        yield lambda nbytes, counted: None
        return
    if size:
        with click.progressbar(length=size, label="sending", file=sys.stderr,
                               show_pos=False, show_percent=True, show_eta=True) as bar:
            yield lambda nbytes, counted: bar.update(nbytes)
        return
    sent = [0, 0.0]

    def count(nbytes: int, counted: bool) -> None:
        sent[0] += counted
        now = time.monotonic()
        if now - sent[1] >= 0.1:
            sent[1] = now
            sys.stderr.write(f"\rsending: {sent[0]} message(s)")
            sys.stderr.flush()

    try:
        yield count
    finally:
        sys.stderr.write(f"\rsent: {int(sent[0])} message(s)\n")
        sys.stderr.flush()


def _batch_message(line: str, lineno: int, room: str, user: str, where: str) -> Message | None:
    from zrpc.chat import Message

    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and {"user", "room", "content"} & obj.keys():
            fields = {"room": room, "user": user, "content": ""}
            for k in fields:
                if k in obj:
                    if not isinstance(obj[k], str):
                        raise InputError(f"{where} line {lineno}: {k!r} must be a string")
                    fields[k] = obj[k]
            return Message(id=0, user=fields["user"], content=fields["content"], timestamp=0,
                           room=fields["room"])
    return Message(id=0, user=user, content=text, timestamp=0, room=room)


@main.command()
@room_option
@user_option
@click.argument("file", type=click.File("r", encoding="utf-8", lazy=False), default="-",
                required=False)
def batch(room: str, user: str, file: IO[str]) -> None:
    """Send many messages, one per line, on one client stream.

    FILE defaults to stdin (also `-`). Blank lines are skipped. A line that is a JSON object with any of
    "user", "room", "content" overrides those for that message, e.g.
    {"user": "bob", "content": "hi"}. Prints the server's summary.
    """
    where = "stdin" if file.name in ("-", "<stdin>") else file.name

    async def work(s: Settings) -> None:
        chat = await s.chat()
        async with chat:
            reader = LineReader(file)
            with _progress(_input_size(file), on=_isatty(sys.stderr) and not s.out.json_mode) as bar:

                async def messages() -> AsyncIterator[Message]:
                    n = 0
                    async for line in reader:
                        n += 1
                        msg = _batch_message(line, n, room, user, where)
                        bar(len(line.encode("utf-8")), msg is not None)
                        if msg is not None:
                            yield msg

                summary = await chat.batch(messages())
        if s.out.json_mode:
            s.out.json(summary)
        else:
            users = ", ".join(summary.users) if summary.users else "nobody"
            s.out.line(f"sent {s.out.style(str(summary.total_messages), bold=True)} message(s), "
                       f"{summary.total_characters} character(s), from {users}")

    _run(work)


@main.command()
@room_option
@user_option
@click.option("--since-id", type=click.IntRange(min=0), default=None, metavar="N",
              help="Replay the messages after id N first.")
@click.option("--since", "since", type=TimeParam(), default=None, metavar="TIME",
              help="Replay the messages since TIME (ISO-8601 or epoch milliseconds) first.")
@click.option("--count", "-n", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop after N events.")
@click.option("--no-reconnect", is_flag=True, help="Exit on a lost connection instead of resuming.")
def subscribe(room: str, user: str, since_id: int | None, since: int | None, count: int | None,
              no_reconnect: bool) -> None:
    """Print the events of a room as they arrive (Ctrl-C stops, exit 130).

    Messages print as `time #id user: text`; joins and leaves are marked
    with --> and <--. A lost connection is re-established and the
    subscription resumes after the last message printed, without gaps or
    repeats.
    """
    if since_id is not None and since is not None:
        raise click.UsageError("--since-id and --since are mutually exclusive")

    async def work(s: Settings) -> None:
        chat = await s.chat()
        out = s.out

        def retrying(attempt: int, delay: float, exc: RpcError) -> None:
            out.info(f"connection lost ({exc}); resuming in {delay:.1f}s (attempt {attempt})")

        async with chat:
            seen = 0
            events = chat.subscribe(room, user, since_id=since_id, since_timestamp=since,
                                    reconnect=not no_reconnect, on_retry=retrying)
            async with events:
                async for event in events:
                    print_event(out, event)
                    seen += 1
                    if count is not None and seen >= count:
                        break

    _run(work)


@main.command()
@room_option
def who(room: str) -> None:
    """List the users present in a room."""

    async def work(s: Settings) -> None:
        chat = await s.chat()
        async with chat:
            users = await chat.who(room)
        if not users and not s.out.json_mode:
            s.out.line(s.out.style(f"nobody in {room}", dim=True))
        print_users(s.out, users)

    _run(work)


@main.command()
@room_option
@user_option
@click.option("--no-reconnect", is_flag=True, help="Exit on a lost connection instead of resuming.")
def chat(room: str, user: str, no_reconnect: bool) -> None:
    """Chat in a room on one bidirectional stream.

    On joining it shows who is in the room. On a terminal (with
    prompt_toolkit installed): type messages, /who lists the users, /quit or
    Ctrl-D leaves; incoming messages never garble the input line. Without a
    terminal: every line of stdin is sent as a message and the room's events
    are printed; at end of input the stream is closed and the command exits
    (with the exit code of the last refused line, if any). A refused line
    (too long, ...) prints an error and the session carries on. A lost
    connection (a restarted server) is re-established: the session joins
    again as the same user, shows what was missed since the last message
    printed, and resends unacknowledged lines without duplicating them.
    """
    interactive = _isatty(sys.stdin) and _isatty(sys.stdout)
    if interactive:
        try:
            import prompt_toolkit  # noqa: F401
        except ImportError:
            interactive = False

    async def work(s: Settings) -> int | None:
        client = await s.chat()
        outage: list[RpcError] = []

        def retrying(attempt: int, delay: float, exc: RpcError) -> None:
            if not outage:  # one status line per outage, not one per attempt
                s.out.info(f"connection lost ({exc}); reconnecting as {user}...")
            outage.append(exc)

        def resumed(session: ChatSession) -> None:
            outage.clear()
            s.out.info(f"reconnected to {room}; resumed after #{session.last_id}")

        async with client:
            session = client.join(room, user, reconnect=not no_reconnect, on_retry=retrying,
                                  on_resume=resumed)
            await session.open()
            try:
                here = ", ".join(u.name + (" (you)" if u.name == user else "")
                                 for u in await client.who(room))
                if interactive:
                    await _chat_interactive(s, client, session, room, here)
                    return None
                s.out.info(f"joined {room} as {user}; here now: {here or 'nobody'}")
                return await _chat_piped(s, client, session, room)
            finally:
                await session.close()

    _run(work)


class _Seen:
    """The newest message id this process has printed (to wait for our own echoes)."""

    def __init__(self) -> None:
        self.last_id = 0
        self.changed = asyncio.Event()

    def saw(self, event: ChatResponse) -> None:
        msg = event.message
        if msg is not None and msg.id > self.last_id:
            self.last_id = msg.id
            self.changed.set()

    async def wait_for(self, msg_id: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.last_id < msg_id:
            self.changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self.changed.wait()
        return True


async def _print_events(session: ChatSession, out: Output, seen: _Seen,
                        on_end: Callable[[], None] | None = None) -> None:
    try:
        async for event in session:
            seen.saw(event)
            print_event(out, event)
    finally:
        if on_end is not None:
            on_end()


async def _chat_line(s: Settings, client: ChatClient, session: ChatSession, room: str,
                     text: str) -> tuple[bool, int, RpcError | None]:
    """One input line: a /command or a message.

    Returns (keep going, id of a sent message or 0, the refusal if the
    server refused it). A refused line does not end the session.
    """
    if text.startswith("/") and not text.startswith("//"):
        return await _chat_command(s, client, room, text), 0, None
    try:
        stored = await session.send(text[1:] if text.startswith("//") else text)
    except RpcError as exc:
        if session.closed:
            raise
        Output.error(exc)
        return True, 0, exc
    return True, stored.id, None


async def _stop_printer(printer: asyncio.Task[Any]) -> None:
    if not printer.done():
        printer.cancel()
        with contextlib.suppress(asyncio.CancelledError, RpcError):
            await printer


async def _chat_command(s: Settings, client: ChatClient, room: str, text: str) -> bool:
    """Handle a /command; False when it means: leave."""
    cmd = text.split()[0].lower()
    if cmd in ("/quit", "/exit", "/leave"):
        return False
    if cmd == "/who":
        print_users(s.out, await client.who(room))
    else:
        s.out.info(f"unknown command {cmd} (try /who or /quit; start with // to send a '/')")
    return True


async def _chat_piped(s: Settings, client: ChatClient, session: ChatSession,
                      room: str) -> int | None:
    """Send stdin line by line; returns the exit code of the last refused line (or None)."""
    seen = _Seen()
    printer = asyncio.get_running_loop().create_task(_print_events(session, s.out, seen))
    reader = LineReader(_stdin())
    last_sent = 0
    refused: RpcError | None = None
    try:
        while True:
            read = asyncio.ensure_future(reader.readline())
            done, _ = await asyncio.wait({read, printer}, return_when=asyncio.FIRST_COMPLETED)
            if read not in done:  # the server ended the stream
                read.cancel()
                break
            line = read.result()
            if line is None:
                break
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            going, sent, refusal = await _chat_line(s, client, session, room, text)
            last_sent = sent or last_sent
            refused = refusal or refused
            if not going:
                break
        if last_sent and not printer.done():
            await seen.wait_for(last_sent, ECHO_WAIT_S)  # print our own messages before leaving
        await session.close()
        await printer
    finally:
        await _stop_printer(printer)
    return None if refused is None else exit_code(refused.status)


async def _chat_interactive(s: Settings, client: ChatClient, session: ChatSession,
                            room: str, here: str) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    prompt: PromptSession[str] = PromptSession()
    seen = _Seen()
    ended = False

    def stream_ended() -> None:
        nonlocal ended
        ended = True
        if prompt.app.is_running:
            prompt.app.exit(exception=EOFError())

    with patch_stdout(raw=True):
        out = Output(json_mode=s.out.json_mode, color=s.out.color, stream=sys.stdout)
        s = replace(s, out=out)
        out.info(out.style(f"joined {room} as {session.user}; here now: {here or 'nobody'}; "
                           "/who lists users, /quit leaves", dim=True))
        printer = asyncio.get_running_loop().create_task(
            _print_events(session, out, seen, on_end=stream_ended))
        try:
            while not ended:
                try:
                    text = await prompt.prompt_async(f"{room}> ")
                except (EOFError, KeyboardInterrupt):
                    break
                text = text.strip()
                if not text:
                    continue
                going, _, _ = await _chat_line(s, client, session, room, text)
                if not going:
                    break
            await session.close()
            await printer
        finally:
            await _stop_printer(printer)


# --------------------------------------------------------------------------- generic commands


async def _describe(client: Client) -> list[dict[str, Any]]:
    resp = await client.unary("Reflection/List", {}, dict)
    methods = resp.get("methods") if isinstance(resp, dict) else None
    if not isinstance(methods, list):
        raise RpcError(Status.INTERNAL, "Reflection/List answered without a method list")
    return [m for m in methods if isinstance(m, dict)]


@main.command("list")
def list_methods() -> None:
    """List the server's methods: name, kind, shard key."""

    async def work(s: Settings) -> None:
        client = await s.connect()
        async with client:
            methods = await _describe(client)
        methods.sort(key=lambda m: str(m.get("name")))
        width = max((len(str(m.get("name"))) for m in methods), default=0)
        for m in methods:
            if s.out.json_mode:
                s.out.json(m)
            else:
                name = str(m.get("name"))
                key = m.get("shard_key") or "-"
                s.out.line(f"{s.out.style(name.ljust(width), bold=True)}  "
                           f"{str(m.get('kind')).ljust(13)}  {key}")

    _run(work)


@main.command()
def health() -> None:
    """Check the server's health.

    Prints SERVING, or NOT_SERVING with the reason (e.g. the shards that have
    no live worker). Exits 0 when the server answers SERVING, 1 when it
    answers anything else, 3 when it cannot be reached.
    """

    async def work(s: Settings) -> int:
        client = await s.connect()
        async with client:
            resp = await client.unary("Health/Check", {}, dict)
        status = str(resp.get("status", "UNKNOWN")) if isinstance(resp, dict) else "UNKNOWN"
        if s.out.json_mode:
            s.out.json(resp)
        else:
            reason = resp.get("reason") if isinstance(resp, dict) else None
            s.out.line(s.out.style(status, fg="green" if status == "SERVING" else "red", bold=True)
                       + (f": {reason}" if reason else ""))
        return 0 if status == "SERVING" else 1

    _run(work)


@main.command()
@click.argument("method")
@click.argument("request", required=False, metavar="[JSON]")
@click.option("--kind", type=click.Choice(KINDS), default=None,
              help="The method's kind (default: asked from the server via Reflection/List).")
def call(method: str, request: str | None, kind: str | None) -> None:
    """Call any method with JSON requests; prints JSON responses.

    METHOD is Service/Method; responses are printed one JSON object per line.

    \b
    unary, server_stream: the request is JSON (or one line of stdin; {} if none).
    client_stream, bidi:  each line of stdin is one JSON request (or JSON alone).
    Binary values are written (and may be given) as {"$base64": "..."}.
    """
    if method.count("/") != 1 or method.startswith("/") or method.endswith("/"):
        raise click.BadParameter("expected Service/Method", param_hint="'METHOD'")
    given = None
    if request is not None:
        try:
            given = _parse_json(request, "JSON argument")
        except InputError as exc:
            raise click.BadParameter(str(exc), param_hint="'JSON'") from None

    async def work(s: Settings) -> None:
        client = await s.connect()
        async with client:
            how = kind
            if how is None:
                found = [m for m in await _describe(client) if m.get("name") == method]
                if not found:
                    raise RpcError(Status.UNIMPLEMENTED,
                                   f"the server offers no method {method!r} (see `zrpc list`)")
                how = str(found[0].get("kind"))
            await _call(s, client, method, how, request is not None, given)

    _run(work)


async def _one_request(has_arg: bool, given: Any) -> Any:
    if has_arg:
        return given
    stdin = _stdin()
    if _isatty(stdin):
        return {}
    line = await LineReader(stdin).readline()
    if line is None or not line.strip():
        return {}
    return _parse_json(line, "stdin")


async def _requests(has_arg: bool, given: Any) -> AsyncIterator[Any]:
    if has_arg:
        yield given
        return
    n = 0
    async for line in LineReader(_stdin()):
        n += 1
        if line.strip():
            yield _parse_json(line, f"stdin line {n}")


async def _call(s: Settings, client: Client, method: str, kind: str, has_arg: bool,
                given: Any) -> None:
    out = s.out
    if kind == "unary":
        out.json(await client.unary(method, await _one_request(has_arg, given), dict))
    elif kind == "server_stream":
        stream = await client.server_stream(method, await _one_request(has_arg, given), dict)
        async with stream:
            async for resp in stream:
                out.json(resp)
    elif kind == "client_stream":
        up = await client.client_stream(method, dict, dict)
        async with up:
            try:
                async for req in _requests(has_arg, given):
                    await up.send(req)
            except zrpc.StreamClosed:
                pass  # the server ended the call: close_and_receive raises its status
            out.json(await up.close_and_receive())
    elif kind == "bidi":
        both = await client.bidirectional_stream(method, dict, dict)

        async def pump() -> None:
            try:
                async for req in _requests(has_arg, given):
                    await both.send(req)
            except zrpc.StreamClosed:
                return  # the server ended the call: the receive loop reports its status
            except BaseException:
                await both.close()  # bad input: abandon the call
                raise
            await both.close_send()

        async with both:
            sender = asyncio.get_running_loop().create_task(pump())
            try:
                try:
                    async for resp in both:
                        out.json(resp)
                except RpcError:
                    if sender.done() and not sender.cancelled() and sender.exception() is not None:
                        sender.result()  # the input error that made us cancel the call
                    raise
                if sender.done():
                    sender.result()
            finally:
                if not sender.done():
                    sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
    else:
        raise RpcError(Status.UNIMPLEMENTED, f"{method} has unknown kind {kind!r}")


main.add_command(token)

if __name__ == "__main__":
    main()
