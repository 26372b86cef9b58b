"""Chat in the browser: the broker's HTTPS + WebSocket listener (``--web-port``).

One listener on the broker's event loop (the ``websockets`` package) serves

* the chat page and its scripts (``/``, ``/chat.js``, ``/chat.css``,
  ``/zrpc.js`` and the bundled MessagePack module ``/vendor/msgpack.mjs``),
  read with :mod:`importlib.resources` from the ``zrpc`` package's ``web/``
  data directory, so an installed wheel serves the page with no npm;
* ``/zrpc``: a WebSocket endpoint where every connection is one zrpc
  connection (docs/protocol.md section 1.1). The binary messages carry the
  zrpc byte stream; it is fed to an :class:`~broker.edge.EdgeSession` through
  the same :class:`~broker.edge.EdgeProtocol` as a TLS connection on the main listener, so a
  WebSocket client gets the same router, fan-out, flow control, limits
  (max_connections, max_connections_per_ip, handshake and idle timeouts),
  authentication and shutdown as any other client. Nothing here parses zrpc.

The upgrade is refused with 403 unless the ``Origin`` header is absent
(non-browser clients), this listener's own origin, or one of ``--web-origin``.
A WebSocket message may carry at most ``max(max_message_size, 64 KiB) + 10``
bytes (close code 1009 past it); text messages are a protocol error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import importlib.resources
import logging
import os
import ssl
from collections.abc import Callable, Iterable
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from zrpc.protocol.frames import CONTROL_FRAME_LIMIT, HEADER_SIZE
from zrpc.status import Status

if TYPE_CHECKING:
    from broker.edge import EdgeProtocol
    from zrpc.config import ServerConfig

__all__ = ["PAGES", "WebServer", "web_root"]

log = logging.getLogger("zrpc.broker.web")
#: The websockets library's own log (a line per HTTP request and connection at INFO): warnings only.
ws_log = logging.getLogger("zrpc.broker.web.websockets")
if ws_log.level == logging.NOTSET:
    ws_log.setLevel(logging.WARNING)

#: The WebSocket endpoint's path.
ZRPC_PATH = "/zrpc"
#: The served files: URL path -> file under the web root (nothing else there is served).
PAGES = {"/": "index.html", "/index.html": "index.html", "/chat.js": "chat.js",
         "/chat.css": "chat.css", "/zrpc.js": "zrpc.js", "/vendor/msgpack.mjs": "vendor/msgpack.mjs"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
CLOSE_UNSUPPORTED_DATA = 1003


def web_root() -> Traversable:
    """``$ZRPC_WEB_ROOT`` if set (a directory), else the ``zrpc`` package's ``web/`` data."""
    explicit = os.environ.get("ZRPC_WEB_ROOT")
    return Path(explicit) if explicit else importlib.resources.files("zrpc") / "web"


def _norm_origin(origin: str) -> str:
    o = origin.strip().lower().rstrip("/")
    return o[: -len(":443")] if o.startswith("https://") and o.endswith(":443") else o


class _WsTransport:
    """What :class:`~broker.edge.EdgeProtocol` needs of a transport, over one WebSocket.

    ``write`` is synchronous (as for a socket): data queues here and a writer
    task sends it, everything queued so far in one binary message. The queue
    is bounded the same way a socket's write buffer is: by the flow-control
    windows the client announced, and by the connection's buffer budget
    (``get_write_buffer_size`` counts the queue).
    """

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self._out: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._closing = False
        self.close_code = 1000
        self.close_reason = ""
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    def write(self, data: bytes) -> None:
        if not self._closing and data:
            self._out.append(data)
            self._queued += len(data)
            self._wake.set()

    def get_write_buffer_size(self) -> int:
        return self._queued

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        self._closing = True
        self._out.clear()
        self._queued = 0
        self._writer.cancel()
        transport = self.ws.transport
        if transport is not None:
            transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.ws.transport.get_extra_info(name, default)

    async def _write_loop(self) -> None:
        ws = self.ws
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._out:
                    data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
                    self._out.clear()
                    await ws.send(data)
                    self._queued -= len(data)
                if self._closing:
                    await ws.close(self.close_code, self.close_reason)
                    return
        except ConnectionClosed:
            pass

    async def finished(self, timeout: float) -> None:
        """Wait (bounded) until what was written is sent and the WebSocket closed."""
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._writer), timeout)
        if not self._writer.done():
            self.abort()

    def stop(self) -> None:
        if not self._writer.done():
            self._writer.cancel()


class WebServer:
    """The ``--web-port`` listener of one broker (see module docstring)."""

    def __init__(self, protocol: Callable[[], EdgeProtocol], server_config: ServerConfig,
                 tls_context: ssl.SSLContext | None, host: str, port: int,
                 origins: Iterable[str] = (), root: Traversable | None = None) -> None:
        self.protocol = protocol        # a new edge connection of the broker
        self.server_config = server_config
        self.ssl = tls_context
        self.host = host
        self.port = port
        self.origins = {_norm_origin(o) for o in origins}
        self.root = root or web_root()
        self.scheme = "https" if tls_context is not None else "http"
        self.server: Server | None = None
        self.address: tuple[str, int] | None = None
        self.transports: set[_WsTransport] = set()
        cfg = server_config
        self.max_ws_message = max(cfg.max_message_size, CONTROL_FRAME_LIMIT) + HEADER_SIZE
        self._csp = self._content_security_policy()
        self._files: dict[str, bytes] = {}
        for name in sorted(set(PAGES.values())):
            try:
                self._files[name] = self.root.joinpath(name).read_bytes()
            except OSError as exc:
                log.warning("web page file %s is missing (%s): it will answer 404", name, exc)

    @staticmethod
    def context_for(tls_context: ssl.SSLContext | None, tls: Any) -> ssl.SSLContext | None:
        """The main listener's TLS settings (certificate, client CA, TLS 1.3) with ALPN http/1.1."""
        if tls_context is None:
            return None
        ctx = tls.server_context()
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def start(self) -> tuple[str, int]:
        cfg = self.server_config
        self.server = await serve(
            self._handler, self.host, self.port, ssl=self.ssl,
            process_request=self._process_request,
            compression=None,              # zrpc compresses messages itself (COMPRESSED flag)
            max_size=self.max_ws_message,
            max_queue=16,
            open_timeout=cfg.handshake_timeout_ms / 1000,
            ping_interval=20, ping_timeout=20, close_timeout=5,
            server_header=None, logger=ws_log, backlog=1024)
        name = self.server.sockets[0].getsockname()
        self.address = (name[0], name[1])
        log.info("web chat on %s://%s:%d/ (zrpc over WebSocket at %s)", self.scheme,
                 self.address[0], self.address[1], ZRPC_PATH)
        return self.address

    def close(self) -> None:
        """Stop accepting; open WebSockets end with their zrpc sessions (Broker.shutdown)."""
        if self.server is not None:
            self.server.close(close_connections=False)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        if self.server is None:
            return
        try:
            await asyncio.wait_for(self.server.wait_closed(), timeout)
        except TimeoutError:
            for transport in list(self.transports):
                transport.abort()

    # ---------------------------------------------------------------- HTTP
    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == ZRPC_PATH:
            origins = request.headers.get_all("Origin")
            if len(origins) > 1 or (origins and not self._origin_allowed(origins[0], request.headers)):
                log.warning("refusing WebSocket from %s: origin %r not allowed (see --web-origin)",
                            conn.remote_address, origins)
                return self._response(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n",
                                      "text/plain; charset=utf-8")
            return None  # the WebSocket handshake proper (a plain GET gets 426)
        return self._static(path)

    def _origin_allowed(self, origin: str, headers: Headers) -> bool:
        o = _norm_origin(origin)
        if o in self.origins:
            return True
        hosts = headers.get_all("Host")
        return len(hosts) == 1 and o == _norm_origin(f"{self.scheme}://{hosts[0]}")

    def _static(self, path: str) -> Response:
        name = PAGES.get(path)
        body = self._files.get(name) if name is not None else None
        if name is None or body is None:
            return self._response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
        ctype = TYPES.get(os.path.splitext(name)[1]) or "application/octet-stream"
        return self._response(http.HTTPStatus.OK, body, ctype)

    def _response(self, status: http.HTTPStatus, body: bytes, ctype: str) -> Response:
        headers = Headers([
            ("Content-Type", ctype),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("Content-Security-Policy", self._csp),
            ("Connection", "close"),
        ])
        return Response(status.value, status.phrase, headers, body)

    def _content_security_policy(self) -> str:
        """Only this origin's scripts and styles."""
        return ("default-src 'none'; script-src 'self'; style-src 'self'; "
                "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'")

    # ----------------------------------------------------------- WebSocket
    async def _handler(self, ws: ServerConnection) -> None:
        transport = _WsTransport(ws)
        self.transports.add(transport)
        proto = self.protocol()
        proto.connection_made(transport)
        try:
            if proto.session is None:  # refused (limits, shutting down): a GOAWAY is on its way
                return
            async for message in ws:
                if isinstance(message, str):
                    s = proto.session
                    assert s is not None
                    transport.close_code = CLOSE_UNSUPPORTED_DATA
                    transport.close_reason = "zrpc uses binary messages"
                    s.conn.close(Status.INTERNAL, "text message: zrpc over WebSocket uses binary messages")
                    s.terminate(Status.INTERNAL, "text message on the WebSocket")
                    break
                proto.data_received(message)
        except ConnectionClosed:  # closed by the peer with an error code (e.g. 1009 message too big)
            pass
        finally:
            proto.connection_lost(None)
            if transport.is_closing():  # the broker closed it: let the last frames (GOAWAY) out
                await transport.finished(timeout=2.0)
            else:
                transport.stop()
            self.transports.discard(transport)
