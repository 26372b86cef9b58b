"""Drain a ZeroMQ socket from an asyncio loop without a future per message.

ZeroMQ exposes one file descriptor per socket that is *edge*-triggered: it
signals when the socket's state changes, not while messages wait. So the
reader drains while ``EVENTS & POLLIN`` says more is there, yields to the loop
every ``batch`` messages (fairness), and must be *kicked* after the owner
sends on the socket, because a send can consume the edge that a concurrent
arrival would have produced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import zmq

__all__ = ["SocketReader"]

log = logging.getLogger("zrpc.zmq")


class SocketReader:
    """Calls ``handle(parts)`` for every multipart message arriving on ``sock``."""

    def __init__(self, sock: zmq.Socket[Any], handle: Callable[[list[bytes]], Any], *,
                 batch: int = 512) -> None:
        self.sock = sock
        self.handle = handle
        self.batch = batch
        self.loop = asyncio.get_running_loop()
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._scheduled = False
        self._closed = False
        self.loop.add_reader(self._fd, self._ready)
        self.kick()  # messages may already be queued

    def kick(self) -> None:
        """Check for messages soon (call after sending on the socket)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._ready)

    def _ready(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        sock = self.sock
        recv = sock.recv_multipart
        handle = self.handle
        try:
            for _ in range(self.batch):
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator,arg-type]
                    return
                try:
                    msg = recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                try:
                    handle(msg)
                except Exception:
                    log.exception("error handling a ZeroMQ message")
        except zmq.ZMQError as exc:  # socket closed under us
            log.debug("reader stopped: %s", exc)
            return
        self.kick()  # more may be waiting: continue on the next loop iteration

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.loop.remove_reader(self._fd)
