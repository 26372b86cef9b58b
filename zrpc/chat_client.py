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

Sends are exactly-once: :meth:`ChatClient.send`, :meth:`ChatClient.batch` and
:meth:`ChatSession.send` put an idempotency key on every message (unless the
caller set one) and retry ``UNAVAILABLE`` (which includes
:class:`~zrpc.ConnectionReset`) and ``DEADLINE_EXCEEDED`` with backoff until
the call's deadline: the server answers a resent key with the first ack, so a
message whose first attempt was stored but not acknowledged is not stored
twice. A :class:`ChatSession` whose stream is lost rejoins (same user), asks
for the messages after the last one it yielded, and resends its
unacknowledged messages with their keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from typing import TypeVar

from zrpc.address import Address
from zrpc.chat import (
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
from zrpc.chat_retry import (
    RETRYABLE,
    SEND_RETRYABLE,
    Backoff,
    Connector,
    RetryHook,
    alive,
    keyed,
    new_key,
    new_message,
    stored_message,
)
from zrpc.chat_session import ChatSession
from zrpc.client import Client, ServerStream
from zrpc.config import ClientConfig
from zrpc.status import ConnectionReset, RpcError, StreamClosed, Timeout
from zrpc.tls import TlsConfig

__all__ = [
    "RETRYABLE",
    "SEND_RETRYABLE",
    "Backoff",
    "ChatClient",
    "ChatSession",
    "Connector",
    "Subscription",
    "new_key",
]

log = logging.getLogger("zrpc.chat_client")
T = TypeVar("T")

class ChatClient:
    """Typed chat calls over a :class:`zrpc.Client` (see module docstring).

    ``connect`` (optional) makes a fresh connected client; without it a
    subscription whose connection is lost cannot resume and raises.
    ``timeout`` is the deadline (seconds) of the unary and batch calls
    (default: the client's ``request_timeout_ms``), retries included.
    ``retry`` is the backoff between the attempts of a send (True: the
    default, False: one attempt); ``on_retry(attempt, delay, error)`` is called before each wait.
    """

    def __init__(self, client: Client, connect: Connector | None = None, *,
                 timeout: float | None = None, retry: bool | Backoff = True,
                 on_retry: RetryHook | None = None) -> None:
        self._client = client
        self._connect = connect
        self._retired: list[Client] = []  # replaced connections that may still be open
        self._lock = asyncio.Lock()
        self.timeout = timeout
        self.retry = (Backoff(initial=0.05, maximum=1.0) if retry is True
                      else retry or None)
        self.on_retry = on_retry
        self.reconnects = 0
        self.retries = 0

    @classmethod
    async def connect(cls, address: str | Address, tls: TlsConfig | None = None,
                      config: ClientConfig | None = None, *,
                      timeout: float | None = None, retry: bool | Backoff = True,
                      on_retry: RetryHook | None = None) -> ChatClient:
        """Connect to ``address``; later reconnects go to the same address with the same settings."""

        async def factory() -> Client:
            client = Client(config)
            await client.connect(address, tls)
            return client

        return cls(await factory(), factory, timeout=timeout, retry=retry, on_retry=on_retry)

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
            if alive(client):
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
    def _deadline(self, timeout: float | None) -> float | None:
        """The loop time by which a call (all its attempts) must be done."""
        total = timeout if timeout is not None else self.timeout
        if total is None:
            ms = self._client.config.request_timeout_ms
            total = None if ms is None else ms / 1000
        return None if total is None else asyncio.get_running_loop().time() + total

    async def _retrying(self, what: str, deadline: float | None,
                        attempt: Callable[[Client, float | None], Awaitable[T]]) -> T:
        """Run ``attempt(client, seconds left)`` until it succeeds, the error is
        not in :data:`SEND_RETRYABLE`, or the deadline leaves no time for another try."""
        loop = asyncio.get_running_loop()
        tries = 0
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            try:
                if remaining is not None and remaining <= 0:
                    raise Timeout(f"{what}: deadline exceeded")
                try:
                    async with asyncio.timeout(remaining):
                        return await attempt(await self.live_client(), remaining)
                except TimeoutError:
                    raise Timeout(f"{what}: deadline exceeded") from None
            except RpcError as exc:
                if self.retry is None or exc.status not in SEND_RETRYABLE:
                    raise
                if self._connect is None and not alive(self._client):
                    raise  # nothing to retry on
                tries += 1
                delay = self.retry.delay(tries)
                left = None if deadline is None else deadline - loop.time()
                if ((left is not None and left <= delay)
                        or (self.retry.max_attempts is not None
                            and tries >= self.retry.max_attempts)):
                    raise
                log.info("%s failed (%s); retrying in %.2fs (attempt %d)", what, exc, delay,
                         tries + 1)
                self.retries += 1
                if self.on_retry is not None:
                    self.on_retry(tries, delay, exc)
                await asyncio.sleep(delay)

    async def send(self, room: str, user: str, content: str, *, idempotency_key: str = "",
                   timeout: float | None = None) -> Message:
        """Store one message exactly once; returns it as stored (id, timestamp).

        The message carries ``idempotency_key`` (a fresh one when empty) and
        is retried on UNAVAILABLE / DEADLINE_EXCEEDED until ``timeout``
        (default: the client's), so a retry after an ambiguous failure
        returns the first ack instead of storing the message again.
        """
        message = new_message(room, user, content, idempotency_key or new_key())

        async def attempt(client: Client, remaining: float | None) -> Message:
            resp = await client.unary(SEND_MESSAGE.name, message, ChatResponse,
                                      timeout=remaining)
            return stored_message(resp, "SendMessage")

        return await self._retrying("SendMessage", self._deadline(timeout), attempt)

    async def batch(self, messages: Iterable[Message] | AsyncIterable[Message], *,
                    timeout: float | None = None) -> BatchSummary:
        """Send many messages on one client stream; returns the server's summary.

        Every message gets an idempotency key (unless it has one). On
        UNAVAILABLE / DEADLINE_EXCEEDED the batch is sent again on a new
        stream, keys unchanged, until ``timeout``: the messages already stored
        are answered from the dedupe index, the rest are stored. (The messages
        are kept in memory until the call ends, to be resent.)
        """
        source = messages.__aiter__() if isinstance(messages, AsyncIterable) else iter(messages)
        sent: list[Message] = []
        exhausted = False

        async def upcoming() -> AsyncIterator[Message]:
            nonlocal exhausted
            for m in list(sent):  # a retry resends what an earlier attempt sent
                yield m
            while not exhausted:
                try:
                    if isinstance(source, AsyncIterator):
                        m = await source.__anext__()
                    else:
                        m = next(source)
                except (StopIteration, StopAsyncIteration):
                    exhausted = True
                    return
                m = keyed(m)
                sent.append(m)
                yield m

        async def attempt(client: Client, remaining: float | None) -> BatchSummary:
            stream = await client.client_stream(SEND_MESSAGE_BATCH.name, Message, BatchSummary,
                                                timeout=remaining)
            try:
                try:
                    async for m in upcoming():
                        await stream.send(m)
                except StreamClosed:
                    pass  # the server ended the call early: close_and_receive raises its real status
                summary: BatchSummary = await stream.close_and_receive()
                return summary
            except BaseException:
                await stream.close()
                raise

        return await self._retrying("SendMessageBatch", self._deadline(timeout), attempt)

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

    def join(self, room: str, user: str, *, reconnect: bool | Backoff = True,
             on_retry: RetryHook | None = None,
             on_resume: Callable[[ChatSession], None] | None = None) -> ChatSession:
        """A ``Chat/JoinChat`` session: ``async with chat.join(room, user) as session``.

        ``reconnect``: True (default backoff), a :class:`Backoff`, or False to
        end the session on the first lost stream (see :class:`ChatSession`).
        """
        policy = Backoff() if reconnect is True else (reconnect or None)
        return ChatSession(self, room, user, reconnect=policy, on_retry=on_retry,
                           on_resume=on_resume)


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
                if self.chat._connect is None and not alive(self.chat._client):
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
