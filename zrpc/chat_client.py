"""A typed convenience layer over the chat contract (:mod:`zrpc.chat`).

::

    chat = await ChatClient.connect("localhost:8443", zrpc.TlsConfig.client())
    async with chat:
        stored = await chat.send("lobby", "ada", "hello")          # -> Message (id, timestamp)
        summary = await chat.batch([Message(...), ...])             # -> BatchSummary
        async with chat.subscribe("lobby", "ada", since_id=10) as events:
            async for event in events:                              # ChatResponse, resumes on drops
                ...
        async with chat.join("lobby", "ada") as session:            # the bidirectional JoinChat
            await session.send("hi all")
            async for event in session: ...
        users = await chat.who("lobby")                             # -> list[User]

:meth:`ChatClient.subscribe` survives lost connections: on
:class:`~zrpc.ConnectionReset` or an ``UNAVAILABLE`` / ``ABORTED`` /
``RESOURCE_EXHAUSTED`` status it reconnects (through the ``connect`` factory)
with exponential backoff and re-subscribes with ``since_id`` = the id of the
last message it yielded, dropping any message with an id at or below it, so
the caller sees every message of the room exactly once and in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from zrpc.address import Address
from zrpc.chat import (
    JOIN_CHAT,
    LIST_USERS,
    SEND_MESSAGE,
    SEND_MESSAGE_BATCH,
    SUBSCRIBE_TO_ROOM,
    BatchSummary,
    ChatResponse,
    ListUsersRequest,
    ListUsersResponse,
    Message,
    ResponseType,
    SubscribeRequest,
    User,
)
from zrpc.client import BidirectionalStream, Client, ServerStream
from zrpc.config import ClientConfig
from zrpc.status import ConnectionReset, RpcError, Status, StreamClosed
from zrpc.tls import TlsConfig

__all__ = [
    "RETRYABLE",
    "Backoff",
    "ChatClient",
    "ChatSession",
    "Connector",
    "Subscription",
]

log = logging.getLogger("zrpc.chat_client")

#: Statuses after which a subscription reconnects and resumes.
RETRYABLE = frozenset({Status.UNAVAILABLE, Status.ABORTED, Status.RESOURCE_EXHAUSTED})

#: Makes a new connected client (used to reconnect).
Connector = Callable[[], Awaitable[Client]]
#: ``on_retry(attempt, delay_seconds, error)``: called before each reconnect wait.
RetryHook = Callable[[int, float, RpcError], None]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between reconnect attempts.

    The n-th consecutive failed attempt waits ``min(maximum, initial * multiplier**(n-1))``
    seconds, spread by +/- ``jitter`` (a fraction). ``max_attempts`` consecutive
    failures (None: never) make the subscription give up and raise the last error.
    The count restarts whenever a resumed stream delivers an event.
    """

    initial: float = 0.05
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int | None = None

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.multiplier ** max(0, attempt - 1))
        if self.jitter:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, base)


def _alive(client: Client) -> bool:
    s = client.session
    return s is not None and not s.closed and s.goaway is None


def _stored(resp: ChatResponse, what: str) -> Message:
    """The stored message an ack carries (errors become RpcError)."""
    if resp.type is ResponseType.error:
        raise RpcError(Status.INVALID_ARGUMENT, resp.error_message or f"{what} refused")
    if resp.type is not ResponseType.ack or resp.message is None:
        raise RpcError(Status.INTERNAL, f"{what}: expected an ack carrying the stored message, "
                                        f"got {resp.type.value}")
    return resp.message


def _new_message(room: str, user: str, content: str) -> Message:
    return Message(user=user, content=content, room=room)


class ChatClient:
    """Typed chat calls over a :class:`zrpc.Client` (see module docstring).

    ``connect`` (optional) makes a fresh connected client; without it a
    subscription whose connection is lost cannot resume and raises.
    ``timeout`` is the deadline (seconds) of the unary and batch calls
    (default: the client's ``request_timeout_ms``).
    """

    def __init__(self, client: Client, connect: Connector | None = None, *,
                 timeout: float | None = None) -> None:
        self._client = client
        self._connect = connect
        self._retired: list[Client] = []  # replaced connections that may still be open
        self._lock = asyncio.Lock()
        self.timeout = timeout
        self.reconnects = 0

    @classmethod
    async def connect(cls, address: str | Address, tls: TlsConfig | None = None,
                      config: ClientConfig | None = None, *,
                      timeout: float | None = None) -> ChatClient:
        """Connect to ``address``; later reconnects go to the same address with the same settings."""

        async def factory() -> Client:
            client = Client(config)
            await client.connect(address, tls)
            return client

        return cls(await factory(), factory, timeout=timeout)

    @property
    def client(self) -> Client:
        """The current connection (replaced when a subscription reconnects)."""
        return self._client

    async def close(self) -> None:
        """Close the connection (and any replaced one still draining after a GOAWAY)."""
        for old in self._retired:
            await old.close()
        self._retired.clear()
        await self._client.close()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def live_client(self) -> Client:
        """The current client if its connection is usable, else a new one from ``connect``.

        Every call goes through this, so a ChatClient with a ``connect`` factory
        reconnects lazily after a lost connection (a failed call is not retried).
        """
        async with self._lock:
            client = self._client
            if _alive(client):
                return client
            if self._connect is None:
                raise ConnectionReset("the connection is lost and this ChatClient cannot reconnect "
                                      "(no connect factory)")
            fresh = await self._connect()
            self._client = fresh
            self.reconnects += 1
            if client.session is not None and client.session.closed:
                await client.close()
            else:  # going away: its calls in flight may still finish
                self._retired = [c for c in self._retired if c.session is None or not c.session.closed]
                self._retired.append(client)
            return fresh

    # ------------------------------------------------------------------ calls
    async def send(self, room: str, user: str, content: str) -> Message:
        """Store one message; returns it as stored (id, timestamp)."""
        client = await self.live_client()
        resp = await client.unary(SEND_MESSAGE.name, _new_message(room, user, content),
                                        ChatResponse, timeout=self.timeout)
        return _stored(resp, "SendMessage")

    async def batch(self, messages: Iterable[Message] | AsyncIterable[Message]) -> BatchSummary:
        """Send many messages on one client stream; returns the server's summary."""
        client = await self.live_client()
        stream = await client.client_stream(SEND_MESSAGE_BATCH.name, Message, BatchSummary,
                                                  timeout=self.timeout)
        try:
            try:
                if isinstance(messages, AsyncIterable):
                    async for m in messages:
                        await stream.send(m)
                else:
                    for m in messages:
                        await stream.send(m)
            except StreamClosed:
                pass  # the server ended the call early: close_and_receive raises its real status
            summary: BatchSummary = await stream.close_and_receive()
            return summary
        except BaseException:
            await stream.close()
            raise

    async def who(self, room: str) -> list[User]:
        """The users present in ``room``."""
        client = await self.live_client()
        resp: ListUsersResponse = await client.unary(
            LIST_USERS.name, ListUsersRequest(room=room), ListUsersResponse, timeout=self.timeout)
        return list(resp.users)

    def subscribe(self, room: str, user: str, since_id: int | None = None,
                  since_timestamp: int | None = None, *, reconnect: bool | Backoff = True,
                  on_retry: RetryHook | None = None) -> Subscription:
        """Events of ``room`` (replayed history after ``since_id``/``since_timestamp``, then live).

        ``reconnect``: True (default backoff), a :class:`Backoff`, or False to raise
        the first error. Use as ``async with chat.subscribe(...) as events`` (or call
        :meth:`Subscription.aclose`) to end the stream early.
        """
        policy = Backoff() if reconnect is True else (reconnect or None)
        return Subscription(self, room, user, since_id, since_timestamp, policy, on_retry)

    def join(self, room: str, user: str) -> ChatSession:
        """A ``Chat/JoinChat`` session: ``async with chat.join(room, user) as session``."""
        return ChatSession(self, room, user)


class Subscription:
    """An async iterator of :class:`ChatResponse` that resumes after lost connections.

    ``last_id`` is the id of the last message yielded, ``resumes`` how many times
    the stream was re-established.

    Resuming asks for the messages after ``last_id``. A live-only subscription
    (neither ``since_id`` nor ``since_timestamp``) that loses its connection
    before any message arrived has no id to resume from: it resumes with
    ``since_timestamp`` = the local time at which it first subscribed, so a
    message sent during the outage is still delivered (exact up to the clock
    difference between this host and the server).
    """

    def __init__(self, chat: ChatClient, room: str, user: str, since_id: int | None,
                 since_timestamp: int | None, policy: Backoff | None,
                 on_retry: RetryHook | None) -> None:
        self.chat = chat
        self.room = room
        self.user = user
        self.last_id = since_id
        self.since_timestamp = since_timestamp
        self.policy = policy
        self.on_retry = on_retry
        self.resumes = 0
        self._stream: ServerStream[ChatResponse] | None = None
        self._closing = False
        self._live_since: int | None = None
        self._gen = self._run()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ChatResponse:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """End the subscription (the server's handler is cancelled)."""
        self._closing = True
        stream = self._stream
        if stream is not None:
            await stream.close()
        with contextlib.suppress(RuntimeError):  # being iterated by another task: it ends by itself
            await self._gen.aclose()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _request(self) -> SubscribeRequest:
        if self.last_id is not None:
            return SubscribeRequest(room=self.room, user=self.user, since_id=self.last_id,
                                    since_timestamp=None)
        if self.since_timestamp is None and self._live_since is not None:
            return SubscribeRequest(room=self.room, user=self.user, since_id=None,
                                    since_timestamp=self._live_since)
        return SubscribeRequest(room=self.room, user=self.user, since_id=None,
                                since_timestamp=self.since_timestamp)

    async def _run(self) -> AsyncGenerator[ChatResponse, None]:
        attempt = 0
        first = True
        while not self._closing:
            try:
                client = await self.chat.live_client()
                request = self._request()
                if first and self.last_id is None and self.since_timestamp is None:
                    self._live_since = int(time.time() * 1000) - 1
                stream = await client.server_stream(SUBSCRIBE_TO_ROOM.name, request, ChatResponse)
                if not first:
                    self.resumes += 1
                first = False
                self._stream = stream
                try:
                    while True:
                        event = await stream.next()
                        if event is None:
                            return  # the server ended the subscription
                        attempt = 0
                        msg = event.message
                        if event.type is ResponseType.message and msg is not None:
                            if self.last_id is not None and msg.id <= self.last_id:
                                continue  # already yielded before the reconnect
                            self.last_id = msg.id
                        yield event
                finally:
                    self._stream = None
                    await stream.close()
            except RpcError as exc:
                first = False
                if self._closing:
                    return
                if self.policy is None or exc.status not in RETRYABLE:
                    raise
                if self.chat._connect is None and not _alive(self.chat._client):
                    raise
                attempt += 1
                if self.policy.max_attempts is not None and attempt > self.policy.max_attempts:
                    raise
                delay = self.policy.delay(attempt)
                log.info("subscription to %s lost (%s); resuming after id %s in %.2fs (attempt %d)",
                         self.room, exc, self.last_id, delay, attempt)
                if self.on_retry is not None:
                    self.on_retry(attempt, delay, exc)
                await asyncio.sleep(delay)


_END = object()


class ChatSession:
    """One ``Chat/JoinChat`` stream: the first message joins, then ``send`` and iterate.

    ``async for event in session`` yields the room's events (messages, including
    this session's own, and joins/leaves); acks are consumed by :meth:`send`,
    which returns the stored message. ``joined`` is the join's ack.
    """

    def __init__(self, chat: ChatClient, room: str, user: str) -> None:
        self.chat = chat
        self.room = room
        self.user = user
        self.joined: ChatResponse | None = None
        self.error: RpcError | None = None
        self._stream: BidirectionalStream[Message, ChatResponse] | None = None
        self._pending: collections.deque[asyncio.Future[Message]] = collections.deque()
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

    async def open(self) -> ChatResponse:
        """Open the stream and join; returns the join's ack."""
        client = await self.chat.live_client()
        stream = await client.bidirectional_stream(JOIN_CHAT.name, Message, ChatResponse)
        self._stream = stream
        try:
            await stream.send(_new_message(self.room, self.user, ""))
            while True:
                resp = await stream.receive()
                if resp is None:
                    raise RpcError(Status.INTERNAL, "the server ended JoinChat without acknowledging the join")
                if resp.type is ResponseType.ack:
                    self.joined = resp
                    break
                if resp.type is ResponseType.error:
                    raise RpcError(Status.INVALID_ARGUMENT, resp.error_message or "join refused")
                self._events.put_nowait(resp)  # an event that overtook the ack
        except BaseException:
            await stream.close()
            self._finished.set()
            raise
        self._reader = asyncio.get_running_loop().create_task(self._read(stream))
        return resp

    async def send(self, text: str) -> Message:
        """Send one message; returns it as stored (from its ack)."""
        stream = self._stream
        if stream is None or self._finished.is_set() or self._half_closed:
            raise StreamClosed("the chat session is closed") if self.error is None else self.error
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        async with self._send_lock:
            self._pending.append(fut)
            try:
                await stream.send(_new_message(self.room, self.user, text))
            except BaseException:
                if fut in self._pending:
                    self._pending.remove(fut)
                fut.cancel()
                if self.error is not None:
                    raise self.error from None
                raise
        return await fut

    async def _read(self, stream: BidirectionalStream[Message, ChatResponse]) -> None:
        try:
            while True:
                resp = await stream.receive()
                if resp is None:
                    break
                if resp.type is ResponseType.ack and self._pending:
                    fut = self._pending.popleft()
                    if not fut.done():
                        try:
                            fut.set_result(_stored(resp, "JoinChat"))
                        except RpcError as exc:
                            fut.set_exception(exc)
                elif resp.type is ResponseType.error and self._pending:
                    fut = self._pending.popleft()
                    if not fut.done():
                        fut.set_exception(RpcError(Status.INVALID_ARGUMENT,
                                                   resp.error_message or "message refused"))
                elif resp.type is not ResponseType.ack:
                    self._events.put_nowait(resp)
        except RpcError as exc:
            self.error = exc
        finally:
            err = self.error or StreamClosed("the chat stream ended")
            while self._pending:
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_exception(err)
            self._finished.set()
            self._events.put_nowait(_END)

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

    async def close_send(self) -> None:
        """Half-close: no more messages; events keep arriving until the server ends the stream."""
        if self._stream is not None and not self._half_closed:
            self._half_closed = True
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
