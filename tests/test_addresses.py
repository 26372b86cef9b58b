"""Addresses, global options and connection diagnostics of the client and the CLI.

* :func:`zrpc.address.parse_address`: every accepted form and one-line refusals.
* The CLI's global options before and after the subcommand (the later wins).
* Pointing a client at the wrong thing (an HTTP port, a TLS port that is not
  zrpc, a server whose CA is not trusted) fails fast with a line that says so.
* A client never writes key material under its ``ZRPC_HOME``.

Servers run in-process on 127.0.0.1 (real TLS, real sockets); the CLI runs
through click's ``CliRunner`` (see ``test_cli_client``).
"""

from __future__ import annotations

import asyncio
import http.server
import os
import pathlib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import test_cli_client
import uvloop
from test_cli_client import ServerThread, cli, closed_port

import zrpc
from zrpc.address import Address, AddressError, parse_address, parse_listen_address
from zrpc.tls import TlsConfig, development_ca_file


@pytest.mark.parametrize(("text", "expected"), [
    ("localhost:8443", Address("zrpc", "localhost", 8443)),
    ("10.1.2.3:1", Address("zrpc", "10.1.2.3", 1)),
    (":8443", Address("zrpc", "localhost", 8443)),
    ("18543", Address("zrpc", "localhost", 18543)),
    ("[::1]:8443", Address("zrpc", "::1", 8443)),
    ("zrpc://chat.example.com:443", Address("zrpc", "chat.example.com", 443)),
    ("ZRPC://host:65535/", Address("zrpc", "host", 65535)),
    ("quic://[::1]:4433", Address("quic", "::1", 4433)),
    (" localhost:8443 ", Address("zrpc", "localhost", 8443)),
])
def test_accepted_forms(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("", "empty"),
    ("localhost", "no port"),
    ("localhost:", "not a number"),
    ("localhost:0", "outside 1..65535"),
    ("localhost:99999", "outside 1..65535"),
    ("99999", "outside 1..65535"),
    ("localhost:" + "9" * 5000, "outside 1..65535"),
    ("localhost:http", "not a number"),
    ("localhost:\uff18\uff14\uff14\uff13", "not a number"),  # full-width digits
    ("https://localhost:8443", "web page"),
    ("ws://localhost:8443", "web page"),
    ("ftp://localhost:21", "unknown scheme"),
    ("zrpc://", "no host"),
    ("zrpc://localhost:8443/chat", "path"),
    ("user@localhost:8443", "user information"),
    ("::1:8443", "brackets"),
    ("[::1]", "no port"),
    ("[::1:8443", "missing ']'"),
    ("[nothost]:8443", "not an IPv6"),
    ("bad host:8443", "not a host name"),
    ("a..b:8443", "not a host name"),
])
def test_refused_forms_say_why_in_one_line(text: str, says: str) -> None:
    with pytest.raises(AddressError) as err:
        parse_address(text)
    message = str(err.value)
    assert says in message
    assert "\n" not in message
    assert isinstance(err.value, ValueError)


def test_listen_addresses_default_to_loopback_and_allow_port_zero() -> None:
    assert parse_listen_address(":0") == Address("zrpc", "127.0.0.1", 0)
    assert parse_listen_address("8443") == Address("zrpc", "127.0.0.1", 8443)
    with pytest.raises(AddressError):
        parse_address(":0")


def test_address_str_round_trips() -> None:
    for text in ("localhost:8443", "[::1]:9", "quic://h:1"):
        assert str(parse_address(text)) == text
        assert parse_address(str(parse_address(text))) == parse_address(text)


# ------------------------------------------------------------------ global options

home = test_cli_client.home  # the fixtures: an isolated ZRPC_HOME, a chat server on a thread
server = test_cli_client.server


def test_global_options_after_the_subcommand_win(server: ServerThread, home: pathlib.Path) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    # Before the command (the environment's ZRPC_SERVER is the dead one).
    assert cli(home, dead, "--server", server.address, "health").stdout == "SERVING\n"
    # After the command.
    assert cli(home, dead, "health", "--server", server.address).stdout == "SERVING\n"
    # Both: the subcommand's value wins, whichever order.
    assert cli(home, None, "--server", dead, "health", "--server", server.address).stdout == "SERVING\n"
    cli(home, None, "--server", server.address, "health", "--server", dead, expect=3)
    # Flags and other options after the command.
    sent = cli(home, dead, "send", "-r", "r", "-u", "ada", "--json", "--timeout", "5",
               "--server", server.address, "hi")
    assert sent.stdout.startswith("{") and '"content":"hi"' in sent.stdout
    # The short form and the PORT-only form.
    port = server.address.rsplit(":", 1)[1]
    assert cli(home, dead, "health", "-s", port).stdout == "SERVING\n"


def test_refused_address_is_one_line_naming_the_option(home: pathlib.Path) -> None:
    result = cli(home, "localhost:1", "health", "--server", "localhost:99999", expect=2)
    assert "--server" in result.stderr and "outside 1..65535" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ the wrong port


class _HttpServer:
    """A plain HTTP server (like the metrics port) on a thread."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def http_port() -> Iterator[str]:
    srv = _HttpServer()
    try:
        yield srv.address
    finally:
        srv.close()


def test_tls_client_on_an_http_port_fails_fast(home: pathlib.Path, http_port: str) -> None:
    zrpc.TlsConfig.development()  # so the client has a CA to trust
    start = time.monotonic()
    result = cli(home, http_port, "--timeout", "30", "health", expect=3)
    assert time.monotonic() - start < 10  # not the 30 s connect timeout
    assert "does not speak TLS" in result.stderr
    assert result.stderr.count("\n") == 1


def test_plaintext_client_on_an_http_port_says_what_it_waited_for(home: pathlib.Path,
                                                                  http_port: str) -> None:
    # An HTTP server waits for a request line that never comes: the deadline says why.
    result = cli(home, http_port, "--timeout", "1", "--insecure", "health", expect=3)
    assert "no zrpc HELLO came back" in result.stderr


def test_plaintext_client_answered_in_http_says_so(home: pathlib.Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = f"127.0.0.1:{listener.getsockname()[1]}"

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                conn.recv(1024)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        result = cli(home, address, "--timeout", "30", "--insecure", "health", expect=3)
        thread.join(10)
    assert "answered in HTTP" in result.stderr


def test_tls_port_without_zrpc_alpn_fails_fast(home: pathlib.Path) -> None:
    """A TLS listener negotiating http/1.1 (the web port) that waits for a request."""
    material = zrpc.tls.ensure_development_ca()
    ready = threading.Event()
    state: dict[str, object] = {}

    async def serve() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(material.server_cert, material.server_key)
        ctx.set_alpn_protocols(["http/1.1"])
        stop = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never answers, like an HTTP server waiting for a request
            writer.close()

        srv = await asyncio.start_server(silent, "127.0.0.1", 0, ssl=ctx)
        state["address"] = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop
        ready.set()
        async with srv:
            await stop.wait()

    thread = threading.Thread(target=uvloop.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        start = time.monotonic()
        result = cli(home, str(state["address"]), "--timeout", "30", "health", expect=3)
        assert time.monotonic() - start < 10
        assert "does not speak zrpc/1" in result.stderr
        # As a process: that one line and nothing else (no asyncio "never retrieved" noise).
        proc = subprocess.run([ZRPC, "--server", str(state["address"]), "health"], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "ZRPC_HOME": str(home)})
        assert proc.returncode == 3
        assert proc.stderr.splitlines() == [f"error: UNAVAILABLE: {state['address']} does not speak zrpc/1 "
                                            "(is it the web page's port?)"], proc.stderr
    finally:
        loop = state.get("loop")
        if isinstance(loop, asyncio.AbstractEventLoop):
            stop = state["stop"]
            assert isinstance(stop, asyncio.Event)
            loop.call_soon_threadsafe(stop.set)
        thread.join(10)


# ------------------------------------------------------------------ certificates


def test_untrusted_certificate_names_the_ca_tried_and_ca_option(
        server: ServerThread, tmp_path: pathlib.Path) -> None:
    other = tmp_path / "client-home"  # a client with another ZRPC_HOME than the server
    result = cli(other, server.address, "health", expect=3)
    assert "CERTIFICATE_VERIFY_FAILED" not in result.stderr or "not trusted" in result.stderr
    assert "not trusted" in result.stderr
    assert str(development_ca_file(other)) in result.stderr
    assert "--ca" in result.stderr
    assert result.stderr.count("\n") == 1
    # It wrote nothing: clients never create key material.
    assert not other.exists()
    # With --ca the same client connects, still writing nothing.
    ca = development_ca_file(server.data_dir.parent / "zrpc-home")
    assert cli(other, server.address, "health", "--ca", str(ca)).stdout == "SERVING\n"
    assert not other.exists()


def test_library_client_default_tls_writes_nothing(server: ServerThread, tmp_path: pathlib.Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    server_home = server.data_dir.parent / "zrpc-home"
    client_home = tmp_path / "client-only"
    monkeypatch.setenv("ZRPC_HOME", str(client_home))

    async def health(tls: TlsConfig | None) -> object:
        async with zrpc.Client() as client:
            await client.connect(server.address, tls)
            return await client.unary("Health/Check", {}, dict)

    with pytest.raises(zrpc.RpcError) as err:
        uvloop.run(health(None))
    assert err.value.status is zrpc.Status.UNAVAILABLE
    assert "not trusted" in err.value.message
    assert not client_home.exists()
    # The default trusts the development CA of its home when it exists (read, not written).
    monkeypatch.setenv("ZRPC_HOME", str(server_home))
    before = sorted(p.name for p in (server_home / "tls").iterdir())
    assert uvloop.run(health(None)) == {"status": "SERVING"}
    assert uvloop.run(health(TlsConfig.client())) == {"status": "SERVING"}
    assert sorted(p.name for p in (server_home / "tls").iterdir()) == before


def test_client_default_trusts_the_system_store_too(tmp_path: pathlib.Path) -> None:
    cfg = TlsConfig.client(tmp_path)
    assert cfg.ca_file is None  # no development CA: the system store alone
    assert "system trust store" in cfg.trust_description()
    zrpc.TlsConfig.development(tmp_path)
    cfg = TlsConfig.client(tmp_path)
    assert cfg.ca_file == str(development_ca_file(tmp_path))
    ctx = cfg.client_context()
    assert ctx is not None
    default = ssl.create_default_context()
    # Every system CA plus the development one.
    assert len(ctx.get_ca_certs()) == len(default.get_ca_certs()) + 1


# ------------------------------------------------------------------ terminal behaviour


ZRPC = os.path.join(os.path.dirname(sys.executable), "zrpc")


def _spawn(server: ServerThread, home: pathlib.Path, *args: str) -> Any:
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "ZRPC_HOME": str(home), "ZRPC_SERVER": server.address, "TERM": "xterm"}
    return pexpect.spawn(ZRPC, list(args), env=env, encoding="utf-8", timeout=30,
                         dimensions=(24, 120))


def test_batch_shows_progress_on_a_terminal_only(server: ServerThread, home: pathlib.Path,
                                                 tmp_path: pathlib.Path) -> None:
    import pexpect

    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"line {i}\n" for i in range(40)))
    child = _spawn(server, home, "batch", "-r", "bar", "-u", "ann", str(lines))
    try:
        child.expect("sending")
        child.expect(r"sent \S*40\S* message\(s\)")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    # From a pipe: a running count instead of a bar.
    child = _spawn(server, home, "batch", "-r", "bar", "-u", "ann")
    try:
        child.sendline("one")
        child.sendline("two")
        child.sendeof()
        child.expect(r"sent: 2 message\(s\)")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    # --json (and a non-terminal stderr, see test_cli_client) draws nothing.
    child = _spawn(server, home, "batch", "--json", "-r", "bar", "-u", "ann", str(lines))
    try:
        child.expect(pexpect.EOF)
        assert "sending" not in (child.before or "")
        assert '"total_messages":40' in (child.before or "")
    finally:
        child.close(force=True)


def test_ctrl_c_during_subscribe_exits_130(server: ServerThread, home: pathlib.Path) -> None:
    child = _spawn(server, home, "subscribe", "-r", "sig", "-u", "sam", "--since-id", "0")
    try:
        cli(home, server.address, "send", "-r", "sig", "-u", "ann", "marker")
        child.expect(r"ann\S*: marker")
        child.sendintr()  # Ctrl-C from the terminal
        child.expect(pexpect_eof())
    finally:
        child.close(force=True)
    assert child.exitstatus == 130
    assert "Traceback" not in (child.before or "")


def pexpect_eof() -> Any:
    import pexpect

    return pexpect.EOF
