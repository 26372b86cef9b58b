"""One ``Chat/JoinChat`` stream that survives lost connections.

:class:`ChatSession` joins a room, sends messages (each with an idempotency
key) and yields the room's events. When the stream is lost with a status in
:data:`~zrpc.chat_retry.RETRYABLE` (a restarted broker or worker, a dropped
connection), it reconnects with backoff, joins again as the same user asking
for the messages after the last one it yielded (the join message's ``id``, or
its ``timestamp`` before any message was seen), drops any message it already
yielded, and resends the messages still waiting for their ack with the same
keys: the server answers those it had stored with their first ack. So the
caller sees every message of the room once, in order, and each of its own
messages is stored once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zrpc.chat import JOIN_CHAT, ChatResponse, Message, ResponseType
from zrpc.chat_retry import (
    RETRYABLE,
    Backoff,
    RetryHook,
    alive,
    new_key,
    new_message,
    stored_message,
)
from zrpc.client import BidirectionalStream
from zrpc.status import RpcError, Status, StreamClosed

if TYPE_CHECKING:
    from zrpc.chat_client import ChatClient

__all__ = ["ChatSession"]

log = logging.getLogger("zrpc.chat_client")

_END = object()

#: ``on_resume(session)``: called once a lost stream is joined again.
ResumeHook = Callable[["ChatSession"], None]
_Stream = BidirectionalStream[Message, ChatResponse]


class ChatSession:
    """One ``Chat/JoinChat`` session: ``async with chat.join(room, user) as session``.

    ``async for event in session`` yields the room's events (messages,
    including this session's own, and joins/leaves); acks are consumed by
    :meth:`send`, which returns the stored message. ``joined`` is the last
    join's ack. ``reconnect`` (a :class:`~zrpc.chat_retry.Backoff`, or None
    to end on the first error) governs resuming (see the module docstring);
    ``on_retry(attempt, delay, error)`` is called before each wait and
    ``on_resume(session)`` after each successful rejoin. ``last_id`` is the
    id of the last message yielded, ``resumes`` how many times the stream was
    joined again.
    """

    def __init__(self, chat: ChatClient, room: str, user: str, *,
                 reconnect: Backoff | None = None, on_retry: RetryHook | None = None,
                 on_resume: ResumeHook | None = None) -> None:
        self.chat = chat
        self.room = room
        self.user = user
        self.policy = reconnect
        self.on_retry = on_retry
        self.on_resume = on_resume
        self.joined: ChatResponse | None = None
        self.error: RpcError | None = None
        self.last_id = 0
        self.resumes = 0
        self._joined_at = 0  # ms, the first join: where a resume starts before any message
        self._stream: _Stream | None = None
        # sent (or to be resent) messages waiting for their ack, in order
        self._unacked: collections.deque[tuple[Message, asyncio.Future[Message]]] = (
            collections.deque())
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._send_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._half_closed = False

    async def __aenter__(self) -> ChatSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._finished.is_set()

    # ------------------------------------------------------------ joining
    async def open(self) -> ChatResponse:
        """Open the stream and join; returns the join's ack."""
        self._joined_at = int(time.time() * 1000) - 1
        try:
            stream, ack = await self._join(resume=False)
        except BaseException:
            self._finished.set()
            raise
        self._stream = stream
        self._reader = asyncio.get_running_loop().create_task(self._run(stream))
        return ack

    async def _join(self, *, resume: bool) -> tuple[_Stream, ChatResponse]:
        """A new JoinChat stream, joined (and, resuming, replaying what was missed)."""
        client = await self.chat.live_client()
        stream: _Stream = await client.bidirectional_stream(JOIN_CHAT.name, Message, ChatResponse)
        try:
            join = new_message(self.room, self.user, "")
            if resume:  # replay after the last message yielded (or since the first join)
                join.id = self.last_id
                join.timestamp = 0 if self.last_id else self._joined_at
            await stream.send(join)
            while True:
                resp = await stream.receive()
                if resp is None:
                    raise RpcError(Status.INTERNAL,
                                   "the server ended JoinChat without acknowledging the join")
                if resp.type is ResponseType.ack:
                    self.joined = resp
                    return stream, resp
                if resp.type is ResponseType.error:
                    raise RpcError(Status.INVALID_ARGUMENT, resp.error_message or "join refused")
                self._event(resp)  # an event that overtook the ack
        except BaseException:
            await stream.close()
            raise

    def _event(self, resp: ChatResponse) -> None:
        """Queue a room event, dropping a message already yielded (a resume's overlap)."""
        msg = resp.message
        if resp.type is ResponseType.message and msg is not None:
            if msg.id <= self.last_id:
                return
            self.last_id = msg.id
        self._events.put_nowait(resp)

    # ------------------------------------------------------------ sending
    async def send(self, text: str, *, idempotency_key: str = "") -> Message:
        """Send one message; returns it as stored (from its ack).

        It carries ``idempotency_key`` (a fresh one when empty); if the
        stream is lost before its ack, the resumed stream sends it again
        with the same key. A message the server refuses raises
        INVALID_ARGUMENT and the session carries on.
        """
        if self._stream is None or self._finished.is_set() or self._half_closed:
            raise StreamClosed("the chat session is closed") if self.error is None else self.error
        message = new_message(self.room, self.user, text, idempotency_key or new_key())
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        async with self._send_lock:
            if self._finished.is_set():
                raise StreamClosed("the chat session is closed") if self.error is None else self.error
            self._unacked.append((message, fut))
            try:
                await self._stream.send(message)
            except RpcError:
                if self.policy is None:  # no resume: this message fails now
                    self._withdraw(fut)
                    if self.error is not None:
                        raise self.error from None
                    raise
                # else: the reader resumes the stream and resends it (or fails it)
            except BaseException:
                self._withdraw(fut)
                raise
        return await fut

    def _withdraw(self, fut: asyncio.Future[Message]) -> None:
        for item in self._unacked:
            if item[1] is fut:
                self._unacked.remove(item)
                break
        fut.cancel()

    # ------------------------------------------------------------ reading
    async def _run(self, stream: _Stream) -> None:
        try:
            while True:
                try:
                    await self._read(stream)
                    return  # the server ended the stream
                except RpcError as exc:
                    if not self._may_resume(exc):
                        raise
                    stream = await self._resume(exc)
        except RpcError as exc:
            self.error = exc
        finally:
            err = self.error or StreamClosed("the chat stream ended")
            while self._unacked:
                _, fut = self._unacked.popleft()
                if not fut.done():
                    fut.set_exception(err)
            self._finished.set()
            self._events.put_nowait(_END)

    async def _read(self, stream: _Stream) -> None:
        while True:
            resp = await stream.receive()
            if resp is None:
                return
            if resp.type is ResponseType.ack:
                if self._unacked:
                    _, fut = self._unacked.popleft()
                    if not fut.done():
                        try:
                            fut.set_result(stored_message(resp, "JoinChat"))
                        except RpcError as exc:
                            fut.set_exception(exc)
            elif resp.type is ResponseType.error and self._unacked:
                _, fut = self._unacked.popleft()
                if not fut.done():
                    fut.set_exception(RpcError(Status.INVALID_ARGUMENT,
                                               resp.error_message or "message refused"))
            else:
                self._event(resp)

    def _may_resume(self, exc: RpcError) -> bool:
        return (self.policy is not None and not self._half_closed and exc.status in RETRYABLE
                and (self.chat._connect is not None or alive(self.chat.client)))

    async def _resume(self, exc: RpcError) -> _Stream:
        """Join again (with backoff) and resend the unacknowledged messages."""
        assert self.policy is not None
        attempt = 0
        while True:
            attempt += 1
            if self.policy.max_attempts is not None and attempt > self.policy.max_attempts:
                raise exc
            delay = self.policy.delay(attempt)
            log.info("chat stream in %s lost (%s); joining again after id %d in %.2fs "
                     "(attempt %d)", self.room, exc, self.last_id, delay, attempt)
            if self.on_retry is not None:
                self.on_retry(attempt, delay, exc)
            await asyncio.sleep(delay)
            try:
                async with self._send_lock:
                    stream, _ = await self._join(resume=True)
                    try:
                        for message, _fut in list(self._unacked):
                            await stream.send(message)
                    except BaseException:
                        await stream.close()
                        raise
                    self._stream = stream
            except RpcError as again:
                if again.status not in RETRYABLE:
                    raise
                exc = again
                continue
            self.resumes += 1
            if self.on_resume is not None:
                self.on_resume(self)
            return stream

    def __aiter__(self) -> ChatSession:
        return self

    async def __anext__(self) -> ChatResponse:
        item = await self._events.get()
        if item is _END:
            self._events.put_nowait(_END)  # later calls end too
            if self.error is not None:
                raise self.error
            raise StopAsyncIteration
        event: ChatResponse = item
        return event

    # ------------------------------------------------------------ leaving
    async def close_send(self) -> None:
        """Half-close: no more messages; events keep arriving until the server ends the stream."""
        if self._stream is not None and not self._half_closed:
            self._half_closed = True
            async with self._send_lock:
                await self._stream.close_send()

    async def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the server has ended the stream; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._finished.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Leave: half-close, give the server ``timeout`` seconds to end the stream, then cancel it."""
        if self._stream is None:
            return
        with contextlib.suppress(RpcError):
            await self.close_send()
        await self.wait_closed(timeout)
        await self._stream.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._finished.set()
