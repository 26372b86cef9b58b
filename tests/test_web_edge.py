"""The broker's web listener (``--web-port``): static files, origin check, zrpc over WebSocket,
and the TCP edge's guarantees for WebSocket connections (limits, hostile input)."""

from __future__ import annotations

import asyncio
import http.client
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import zrpc
from procs import ROOT, BrokerProc, start_broker
from zrpc.protocol.connection import Connection, Role
from zrpc.protocol.events import GoAwayReceived, HelloReceived, MessageReceived, StatusReceived
from zrpc.protocol.frames import FrameType, encode_frame
from zrpc.status import Status
from zrpc.tls import TlsConfig

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

MAX_MESSAGE = 100_000
ALLOWED = "https://chat.example.test"


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProc, Path]]:
    home = tmp_path_factory.mktemp("web")
    b = start_broker(home, "--web-port", "0", "--web-origin", ALLOWED, "--max-message-size", str(MAX_MESSAGE),
                     "--max-connections-per-ip", "4")
    try:
        yield b.wait_ready(), home
    finally:
        b.stop()


def web_port(b: BrokerProc) -> int:
    return int(str(b.info["web"]).rsplit(":", 1)[1])


def ssl_context(home: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(home / "tls" / "dev-ca.crt"))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def get(b: BrokerProc, home: Path, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPSConnection("localhost", web_port(b), context=ssl_context(home), timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def run(coro: Any) -> Any:
    return uvloop.run(coro)


def ws_connect(b: BrokerProc, home: Path, origin: str | None = None) -> Any:
    return connect(f"wss://localhost:{web_port(b)}/zrpc", ssl=ssl_context(home), origin=origin,  # type: ignore[arg-type]
                   compression=None, max_size=None, open_timeout=10)


async def zrpc_over(ws: ClientConnection, conn: Connection) -> list[Any]:
    """Send what ``conn`` has queued, then feed it one received WebSocket message."""
    if conn.has_data_to_send:
        await ws.send(conn.data_to_send())
    data = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(data, bytes)
    return conn.receive_data(data)


async def hello(ws: ClientConnection) -> Connection:
    conn = Connection(Role.CLIENT)
    conn.send_hello({"user_agent": "test"})
    events = await zrpc_over(ws, conn)
    assert isinstance(events[0], HelloReceived), events
    return conn


async def goaway_then_close(ws: ClientConnection, conn: Connection) -> tuple[GoAwayReceived, int | None]:
    """Read until the broker's GOAWAY and the WebSocket close."""
    goaway = None
    try:
        while True:
            data = await asyncio.wait_for(ws.recv(), 10)
            assert isinstance(data, bytes)
            for ev in conn.receive_data(data):
                if isinstance(ev, GoAwayReceived):
                    goaway = ev
    except ConnectionClosed as exc:
        assert goaway is not None, f"closed ({exc}) without a GOAWAY"
        return goaway, exc.rcvd.code if exc.rcvd else None


def test_static_files_are_served_with_a_strict_policy(web: tuple[BrokerProc, Path]) -> None:
    b, home = web
    status, headers, body = get(b, home, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert body == (ROOT / "zrpc" / "web" / "index.html").read_bytes()
    csp = headers["content-security-policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert b"<script>" not in body and b'type="importmap"' not in body  # no inline script to allow
    assert headers["x-content-type-options"] == "nosniff"
    for path in ("/chat.js", "/zrpc.js", "/vendor/msgpack.mjs"):
        status, headers, body = get(b, home, path)
        assert status == 200 and headers["content-type"].startswith("text/javascript"), path
    status, headers, _ = get(b, home, "/chat.css")
    assert status == 200 and headers["content-type"].startswith("text/css")
    for path in ("/package.json", "/node-transport.js", "/test/client.test.js", "/vendor/msgpack/index.mjs",
                 "/vendor/../package.json", "/vendor/..%2fpackage.json", "/vendor//etc/passwd",
                 "/../broker/web.py", "/zrpc.js/", "/vendor/msgpack.mjs/"):
        assert get(b, home, path)[0] == 404, path
    assert get(b, home, "/zrpc")[0] == 426  # a plain GET of the WebSocket endpoint: upgrade required


def test_origin_check_on_the_upgrade(web: tuple[BrokerProc, Path]) -> None:
    b, home = web

    async def main() -> None:
        for origin in ("https://evil.example", "http://localhost", "null", f"https://localhost:{web_port(b) + 1}"):
            with pytest.raises(InvalidStatus) as info:
                async with ws_connect(b, home, origin):
                    pass
            assert info.value.response.status_code == 403, origin
        for origin in (None, ALLOWED, f"https://localhost:{web_port(b)}", f"HTTPS://LOCALHOST:{web_port(b)}"):
            async with ws_connect(b, home, origin) as ws:
                conn = await hello(ws)
                assert conn.peer is not None and conn.peer["max_message_size"] == MAX_MESSAGE

    run(main())


def test_a_websocket_is_a_zrpc_connection(web: tuple[BrokerProc, Path]) -> None:
    b, home = web

    async def main() -> None:
        async with ws_connect(b, home) as ws:
            conn = await hello(ws)
            sid = conn.open_stream("Echo/Say", {}, 5000)
            conn.send_message(sid, msgpack.packb({"key": "k", "x": 1}), end_stream=True)
            got: list[Any] = []
            while not any(isinstance(e, StatusReceived) for e in got):
                got += await zrpc_over(ws, conn)
            message = next(e for e in got if isinstance(e, MessageReceived))
            assert msgpack.unpackb(message.payload)["x"] == 1
            assert next(e for e in got if isinstance(e, StatusReceived)).code == 0
            # frames split across WebSocket messages at arbitrary points are one byte stream
            sid = conn.open_stream("Health/Check", {}, None)
            conn.send_message(sid, msgpack.packb({}), end_stream=True)
            data = conn.data_to_send()
            for i in range(len(data)):
                await ws.send(data[i:i + 1])
            got = []
            while not any(isinstance(e, StatusReceived) for e in got):
                got += await zrpc_over(ws, conn)
            assert msgpack.unpackb(next(e for e in got if isinstance(e, MessageReceived)).payload) == {"status": "SERVING"}

    run(main())


def test_hostile_input_is_refused_like_on_the_tcp_edge(web: tuple[BrokerProc, Path]) -> None:
    b, home = web

    async def main() -> None:
        # an unknown frame type: GOAWAY INTERNAL, then the close
        async with ws_connect(b, home) as ws:
            conn = await hello(ws)
            await ws.send(encode_frame(0x0B, 0, 0))
            goaway, _ = await goaway_then_close(ws, conn)
            assert goaway.code == Status.INTERNAL and "unknown frame type" in goaway.message
        # a MESSAGE header above max_message_size: refused on the header
        async with ws_connect(b, home) as ws:
            conn = await hello(ws)
            await ws.send((MAX_MESSAGE + 1).to_bytes(4, "big") + bytes([FrameType.MESSAGE, 0, 0, 0, 0, 1]))
            goaway, _ = await goaway_then_close(ws, conn)
            assert goaway.code == Status.RESOURCE_EXHAUSTED
        # a text message: GOAWAY INTERNAL and close code 1003
        async with ws_connect(b, home) as ws:
            conn = await hello(ws)
            await ws.send("hello?")
            goaway, code = await goaway_then_close(ws, conn)
            assert goaway.code == Status.INTERNAL and code == 1003
        # a WebSocket message above max(max_message_size, 64 KiB) + 10 bytes: close 1009
        async with ws_connect(b, home) as ws:
            conn = await hello(ws)
            await ws.send(bytes(MAX_MESSAGE + 10))  # at the limit: accepted by the WebSocket...
            goaway, code = await goaway_then_close(ws, conn)
            assert goaway.code == Status.INTERNAL and code == 1000  # ...and a zrpc error (frame type 0)
        async with ws_connect(b, home) as ws:
            await hello(ws)
            await ws.send(bytes(MAX_MESSAGE + 11))
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        # a frame before HELLO
        async with ws_connect(b, home) as ws:
            conn = Connection(Role.CLIENT)
            await ws.send(encode_frame(FrameType.PING, 0, 0, bytes(8)))
            goaway, _ = await goaway_then_close(ws, conn)
            assert goaway.code == Status.INTERNAL
        # still serving
        async with ws_connect(b, home) as ws:
            await hello(ws)

    run(main())


def test_websocket_and_tcp_connections_share_the_per_ip_limit(web: tuple[BrokerProc, Path]) -> None:
    b, home = web

    async def main() -> None:
        tcp = [zrpc.Client(zrpc.ClientConfig()) for _ in range(2)]
        for c in tcp:
            await c.connect(b.address, TlsConfig.development(home))
        try:
            async with ws_connect(b, home) as w1, ws_connect(b, home) as w2:
                for w in (w1, w2):
                    await hello(w)
                # 2 TCP + 2 WebSocket = --max-connections-per-ip 4: the next WebSocket is refused
                async with ws_connect(b, home) as w3:
                    goaway, _ = await goaway_then_close(w3, Connection(Role.CLIENT))  # refused before HELLO
                    assert goaway.code == Status.RESOURCE_EXHAUSTED and "max_connections_per_ip" in goaway.message
                late = zrpc.Client(zrpc.ClientConfig())
                with pytest.raises(zrpc.RpcError) as info:
                    await late.connect(b.address, TlsConfig.development(home))
                    await late.unary("Health/Check", {}, dict)
                assert info.value.status in (Status.RESOURCE_EXHAUSTED, Status.UNAVAILABLE)
                await late.close()
            # the WebSockets are gone: their slots are free again
            async with ws_connect(b, home) as w4:
                await hello(w4)
        finally:
            for c in tcp:
                await c.close()

    run(main())
