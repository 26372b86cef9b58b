"""The local broker <-> worker link: the cluster wire's multipart messages over a Unix stream socket.

For workers on the broker's host. The same messages as over ZeroMQ (see
:mod:`cluster.wire`), framed on one stream::

    message = u32 part count, then per part: u32 length, bytes   (big-endian)

Written straight from the event loop thread: the first message of a loop
iteration is written at once, the later ones of that iteration are coalesced
into one more write (so at most two ``send`` syscalls per peer per
iteration, and one wake-up of the peer instead of ZeroMQ's three: sender ->
its I/O thread -> the peer's I/O thread -> the peer). Reading parses every complete message of a read in
one callback. A message larger than ``max_message`` closes the link (the
sender is broken); heartbeats then notice, as with a ZeroMQ peer that went
away. :class:`UnixWorkerEnd` and :class:`LocalBrokerEnd` are the two ends as
:mod:`cluster.link` interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, Final

__all__ = ["LocalBrokerEnd", "StreamLink", "UnixWorkerEnd", "encode_message"]

log = logging.getLogger("zrpc.link")

_U32: Final = struct.Struct("!I")
_U32_PAIR: Final = struct.Struct("!II")


def encode_message(parts: list[bytes]) -> bytes:
    """One message's bytes on the stream."""
    out = [_U32.pack(len(parts))]
    for p in parts:
        out.append(_U32.pack(len(p)))
        out.append(p)
    return b"".join(out)


class StreamLink(asyncio.Protocol):
    """One end of a stream link: ``on_message(parts)`` per message, ``on_lost()`` once at the end."""

    def __init__(self, on_message: Callable[[list[bytes]], Any], on_lost: Callable[[], Any] | None = None,
                 *, max_message: int = 1 << 30) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.max_message = max_message
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_iteration = False  # a message was written in this loop iteration
        self.messages_sent = 0
        self.writes = 0

    # -- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        self._loop = asyncio.get_running_loop()
        if self._out:  # sent before the connection was up
            self._loop.call_soon(self._flush)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.transport = None
        self._out.clear()
        if self.on_lost is not None:
            self.on_lost()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray = buf
        else:
            src = data  # the common case: parse the read itself, no copy into the buffer
        pos = 0
        end = len(src)
        unpack = _U32.unpack_from
        messages: list[list[bytes]] = []
        while end - pos >= 4:
            (n,) = unpack(src, pos)
            p = pos + 4
            parts: list[bytes] = []
            size = 0
            for _ in range(n):
                if end - p < 4:
                    break
                (ln,) = unpack(src, p)
                size += ln
                if size > self.max_message:
                    log.warning("link message over %d bytes: closing the link", self.max_message)
                    self.close()
                    return
                p += 4
                if end - p < ln:
                    break
                parts.append(bytes(src[p:p + ln]))
                p += ln
            if len(parts) < n:
                break  # incomplete: wait for more
            messages.append(parts)
            pos = p
        if src is buf:
            del buf[:pos]
        elif pos < end:
            buf += data[pos:]
        handle = self.on_message
        for parts in messages:
            if self.closed:
                return
            try:
                handle(parts)
            except Exception:
                log.exception("error handling a link message")

    # -- sending ------------------------------------------------------------
    def send(self, parts: list[bytes]) -> None:
        """Send one message: the first of a loop iteration is written at once (no added
        latency), later ones of the same iteration are coalesced into one write after it."""
        if self.closed:
            return
        data = encode_message(parts) if len(parts) != 3 else b"".join(
            (_U32.pack(3), _U32.pack(len(parts[0])), parts[0], _U32.pack(len(parts[1])), parts[1],
             _U32.pack(len(parts[2])), parts[2]))
        self.messages_sent += 1
        loop = self._loop
        if loop is None or self.transport is None:  # not connected yet: connection_made flushes
            self._out.append(data)
            return
        if self._in_iteration or self._out:  # never ahead of what is already queued (order)
            if not self._out:
                loop.call_soon(self._flush)
            self._out.append(data)
            return
        self._in_iteration = True
        loop.call_soon(self._end_iteration)
        self.transport.write(data)
        self.writes += 1

    def _end_iteration(self) -> None:
        self._in_iteration = False

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(out))
            self.writes += 1

    def close(self) -> None:
        """Write what is queued, then close."""
        if self.transport is not None and not self.closed:
            self._flush()
            self.transport.close()


class UnixWorkerEnd:
    """A worker's end of the local link (:class:`cluster.link.WorkerEnd` over ``unix://PATH``).

    Messages sent while connecting are kept and written once connected; a
    send on a closed link connects again (like a ZeroMQ DEALER reconnecting).
    """

    def __init__(self, endpoint: str) -> None:
        if not endpoint.startswith("unix://"):
            raise ValueError(f"not a unix:// endpoint: {endpoint!r}")
        self.endpoint = endpoint
        self.path = endpoint[len("unix://"):]
        self._link: StreamLink | None = None
        self._on_message: Callable[[list[bytes]], Any] | None = None
        self._unreachable = False

    def open(self, on_message: Callable[[list[bytes]], Any]) -> None:
        self.close()
        self._on_message = on_message
        self._connect()

    def _connect(self) -> None:
        assert self._on_message is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)  # a local connect completes at once (or fails at once)
        except OSError as exc:
            sock.close()
            if not self._unreachable:  # once per outage, not on every heartbeat
                log.warning("cannot connect to broker %s: %s", self.endpoint, exc)
            self._unreachable = True
            return
        self._unreachable = False
        sock.setblocking(False)
        link = self._link = StreamLink(self._on_message)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_unix_connection(lambda: link, sock=sock))
        task.add_done_callback(_log_failure)

    def send(self, frames: list[bytes]) -> None:
        link = self._link
        if (link is None or link.closed) and self._on_message is not None:
            self._connect()
            link = self._link
        if link is not None:
            link.send(frames)

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link.closed = True  # nothing more is delivered from the old connection
            self._link = None


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("local link connection failed: %s", task.exception())


class LocalBrokerEnd:
    """The broker's end for its spawned workers: a Unix stream socket at ``path`` beside a
    :class:`cluster.link.BrokerEnd` (ZeroMQ) that serves every other worker and the buses.

    A worker on the local link gets a link identity of its own (``b"\\0link-N"``); sends to it
    go over its stream, everything else to the inner end.
    """

    def __init__(self, inner: Any, path: str) -> None:
        self.inner = inner
        self.path = path
        self.endpoint: str = inner.endpoint
        self.local_endpoint = f"unix://{path}"
        self._links: dict[bytes, StreamLink] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._on_message: Callable[[bytes, list[bytes]], Any] | None = None

    def start(self, on_message: Callable[[bytes, list[bytes]], Any],
              on_event: Callable[[str, int, bytes], Any]) -> None:
        self.inner.start(on_message, on_event)
        self._on_message = on_message
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket file of an earlier broker in this runtime dir
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)  # only this user's processes may link as workers
            sock.listen(128)
        except OSError:
            sock.close()
            self.inner.close()
            raise
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_unix_server(self._new_link, sock=sock))  # accepts queue meanwhile

        def started(t: asyncio.Task[asyncio.AbstractServer]) -> None:
            if not t.cancelled() and t.exception() is None:
                self._server = t.result()
            else:
                sock.close()
                _log_failure(t)
        task.add_done_callback(started)

    def _new_link(self) -> StreamLink:
        identity = b"\0link-%d" % next(self._ids)
        on_message = self._on_message
        assert on_message is not None
        link = StreamLink(lambda frames: on_message(identity, frames),
                          lambda: self._links.pop(identity, None))
        self._links[identity] = link
        return link

    def send(self, worker: bytes, frames: list[bytes]) -> None:
        link = self._links.get(worker)
        if link is not None:
            link.send(frames)
        elif worker[:1] != b"\0":  # a closed local link's messages are dropped, like ZeroMQ's
            self.inner.send(worker, frames)

    def follow(self, bus: str, key: bytes | None = None) -> None:
        self.inner.follow(bus, key)

    def subscribe(self, topic: str) -> None:
        self.inner.subscribe(topic)

    def unsubscribe(self, topic: str) -> None:
        self.inner.unsubscribe(topic)

    def close(self) -> None:
        for link in list(self._links.values()):
            link.close()
        self._links.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self.inner.close()
