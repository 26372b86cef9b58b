"""The chat service handlers of one shard (the streaming tutorial's ``ChatService``, done for real).

Role
----
:class:`ChatService` implements the :data:`zrpc.chat.CHAT` contract for the
rooms its shard owns, on top of :class:`~workers.chat.rooms.RoomTable` (ids,
presence, rings) and :class:`~workers.chat.store.MessageStore` (durable
history). The same object serves the in-process :class:`zrpc.Server`
(``server.add_service(chat.build())``) and a shard worker (through
``services()``, ``replay()``, ``drain_activity()`` and ``close()``, the
:class:`workers.runtime.App` protocol).

The message pipeline
--------------------
A message is accepted in one synchronous step: validate, assign the room's
next id and a timestamp, queue the row for the store's group commit. The
store commits rows in the order they were queued, so commits complete in id
order; when a row is committed, the event ``ChatResponse(message, seq=s)`` is
numbered with the room's next bus sequence ``s`` and published once on topic
``room``, strictly in id order (a per-room "next id to publish" cursor holds
back a message whose predecessor is not resolved yet). Only then is the
sender acked. So: ack => durable; every published message is durable;
events of a room are published in id order with consecutive seqs.

Subscribing without losing or repeating anything
-------------------------------------------------
Per room we keep ``resolved``: every id <= ``resolved`` has been published
(or failed to commit and never will be), and every id > ``resolved`` will be
published with a bus seq greater than the room's current ``bus_seq``. Both
change together in one synchronous step, so a snapshot ``(resolved,
bus_seq)`` read without an ``await`` in between splits the room's messages
exactly: history replay sends ids ``<= resolved``, the fan-out delivers seqs
``> bus_seq``. Replay sends history in pages (from the in-memory ring when it
reaches back far enough, else from the store), then snapshots again; when a
snapshot finds nothing new it attaches the stream at that ``bus_seq`` in the
same step, with no ``await`` in between.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.chat.policy import authorize_room
from workers.chat.presence import PresenceGuard, client_ip
from workers.chat.ratelimit import RateLimiter
from workers.chat.rooms import Room, RoomTable
from workers.chat.store import MessageStore, StoreConfig, StoredMessage, open_store
from zrpc.chat import (
    CHAT,
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
    SubscribeRequest,
    User,
)
from zrpc.codec import DecodeError, encode
from zrpc.context import RequestContext
from zrpc.dispatch import ServerCall
from zrpc.fanout import Bus
from zrpc.service import Service
from zrpc.status import RpcError, Status

__all__ = ["ChatConfig", "ChatService"]

log = logging.getLogger("zrpc.chat")

#: Control characters are refused in room and user names (room names become
#: bus topics delimited by NUL; names are shown on terminals).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Forward = Callable[[Message], Awaitable[ChatResponse]]

#: Longest ``Message.idempotency_key`` accepted, in UTF-8 bytes.
MAX_KEY_BYTES = 64


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class ChatConfig:
    """Configuration of a :class:`ChatService`.

    The history goes to ``store_url`` (``sqlite:///path`` or
    ``postgresql://...``, see :class:`~workers.chat.store.StoreConfig`), else to
    the SQLite file ``store_path``, else to ``<data_dir>/chat.sqlite``;
    ``store_fence`` is ``(shard, lease token)`` for fenced writes to a shared
    store. ``max_content_bytes``, ``max_room_name`` and
    ``max_user_name`` are limits in UTF-8 bytes. ``recent_limit`` messages
    and ``event_ring`` bus events per room are kept in memory (replay and gap
    repair); ``retention_count`` / ``retention_age_ms`` bound the stored
    history when :meth:`ChatService.apply_retention` runs. ``history_page``
    is how many stored messages a replay reads at a time;
    ``max_batch_inflight`` how many messages of one ``SendMessageBatch`` may
    wait for their commit at once. Past ``rooms_in_memory`` rooms, idle ones
    (no members, nothing in flight) are dropped from memory; their history
    stays in the store and their ids continue. Each user (the identity when
    authenticated) may send ``rate_per_s`` messages per second, ``rate_burst``
    at once (0: unlimited): ``SendMessage`` past it fails with
    RESOURCE_EXHAUSTED and ``details {"retry_after_ms": N}``; batch and
    ``JoinChat`` messages are paced instead, unless the wait would pass the
    call's deadline or ``rate_max_wait_ms``. A client connection may keep at
    most ``max_presence_names_per_connection`` distinct user names present
    (``SubscribeToRoom``/``JoinChat`` streams), and unauthenticated connections
    from one IP at most ``max_presence_names_per_ip`` together (per shard);
    a stream past either fails with RESOURCE_EXHAUSTED (docs/chat.md, "What
    presence costs").
    """

    store_path: str = ""
    data_dir: str = ""
    store_url: str = ""
    store_fence: tuple[int, int] | None = None
    max_content_bytes: int = 16384
    recent_limit: int = 1000
    event_ring: int = 4096
    retention_count: int | None = None
    retention_age_ms: int | None = None
    max_room_name: int = 256
    max_user_name: int = 128
    synchronous: str = "NORMAL"
    store_max_batch: int = 512
    history_page: int = 500
    max_batch_inflight: int = 1024
    rooms_in_memory: int = 10_000
    rate_per_s: float = 50.0        # messages per second per user (0: unlimited)
    rate_burst: int = 100           # messages a user may send at once
    rate_max_wait_ms: int = 10_000  # streams wait (are paced) at most this long for the rate
    max_presence_names_per_connection: int = 16
    max_presence_names_per_ip: int = 256  # unauthenticated connections only

    def __post_init__(self) -> None:
        if not self.store_url and not self.store_path and not self.data_dir:
            raise ValueError("ChatConfig needs store_url, store_path or data_dir")
        if self.rate_per_s < 0 or self.rate_burst < 1 or self.rate_max_wait_ms < 0:
            raise ValueError("ChatConfig: rate_per_s must be >= 0, rate_burst >= 1, "
                             "rate_max_wait_ms >= 0")
        for name in ("max_content_bytes", "max_room_name", "max_user_name", "history_page",
                     "max_batch_inflight", "rooms_in_memory", "max_presence_names_per_connection",
                     "max_presence_names_per_ip"):
            if getattr(self, name) < 1:
                raise ValueError(f"ChatConfig.{name} must be >= 1")

    @property
    def path(self) -> str:
        """The store's URL, or the SQLite file of the history."""
        return self.store_url or self.store_path or str(Path(self.data_dir) / "chat.sqlite")

    def store_config(self) -> StoreConfig:
        return StoreConfig(url=self.path, synchronous=self.synchronous,
                           retention_count=self.retention_count,
                           retention_age_ms=self.retention_age_ms,
                           max_batch=self.store_max_batch, fence=self.store_fence)


class _RoomState:
    """The service's publishing state of one room (see the module docstring)."""

    __slots__ = ("last_ts", "lost", "next_pub", "pending", "resolved", "room")

    def __init__(self, room: Room, last_ts: int) -> None:
        self.room = room
        self.resolved = room.last_id      # every id <= resolved is published (or lost)
        self.next_pub = room.last_id + 1
        self.last_ts = last_ts            # timestamps never decrease within a room
        # id -> [message, bus, commit error, committed? (None: not yet), senders' waiters]
        # for ids accepted but not yet published
        self.pending: dict[int, list[Any]] = {}
        self.lost: set[int] = set()       # ids whose commit failed: never published


# An accepted send: the room's state, the message, and the sender's own waiter, which
# completes once the message is published (fails with UNAVAILABLE if it was not stored).
_Accepted = tuple[_RoomState, StoredMessage, "asyncio.Future[None]"]


def _to_message(m: StoredMessage) -> Message:
    return Message(id=m.id, user=m.user, content=m.content, timestamp=m.timestamp, room=m.room,
                   idempotency_key=m.idempotency_key)


def _message_event(m: StoredMessage, seq: int) -> ChatResponse:
    return ChatResponse.message_response(_to_message(m), seq)


class ChatService:
    """The chat handlers of one shard (see the module docstring).

    ``bus`` receives the room events; when None, each call's
    ``context.bus`` is used (the in-process :class:`zrpc.Server` creates its
    own bus). ``owns(room)`` says whether this shard owns a room (default:
    all of them); ``forward(message)`` sends a message of a room owned
    elsewhere (``SendMessageBatch`` only).
    """

    def __init__(self, config: ChatConfig, bus: Bus | None = None, *,
                 owns: Callable[[str], bool] | None = None,
                 forward: Forward | None = None) -> None:
        self.config = config
        self.bus = bus
        self.owns = owns
        self.forward = forward
        self.store: MessageStore = open_store(config.store_config())
        last_ids = self.store.last_ids()
        if owns is not None:  # a shared store holds every shard's rooms: keep this shard's
            last_ids = {room: last for room, last in last_ids.items() if owns(room)}
        self.rooms = RoomTable(recent_limit=config.recent_limit, event_ring=config.event_ring,
                               last_ids=last_ids)
        self._states: dict[str, _RoomState] = {}
        # (room, user, idempotency key) -> the send holding it until its commit resolves
        self._keys: dict[tuple[str, str, str], tuple[_RoomState, StoredMessage]] = {}
        self._activity: dict[str, int] = {}
        self._closing = False
        self._service: Service | None = None
        self._sweep_at = config.rooms_in_memory
        self.limiter = (RateLimiter(config.rate_per_s, config.rate_burst)
                        if config.rate_per_s > 0 else None)
        self.presence = PresenceGuard(config.max_presence_names_per_connection,
                                      config.max_presence_names_per_ip)

    # ------------------------------------------------------------ wiring
    def build(self) -> Service:
        """A :class:`zrpc.Service` with the ``Chat`` handlers bound to this object."""
        svc = Service(CHAT)
        svc.implement(SEND_MESSAGE)(self.send_message)
        svc.implement(SEND_MESSAGE_BATCH)(self.send_message_batch)
        svc.implement(SUBSCRIBE_TO_ROOM)(self.subscribe_to_room)
        svc.implement(JOIN_CHAT)(self.join_chat)
        svc.implement(LIST_USERS)(self.list_users)
        svc.check_complete()
        return svc

    def services(self) -> list[Service]:
        """What a worker serves (the ``App`` protocol)."""
        if self._service is None:
            self._service = self.build()
        return [self._service]

    def replay(self, topic: str, after_seq: int,
               upto_seq: int | None = None) -> list[tuple[int, bytes]] | None:
        """Bus events of room ``topic`` with ``after_seq < seq <= upto_seq`` (gap repair);
        None when the ring no longer holds them."""
        return self.rooms.events_after(topic, after_seq, upto_seq)

    def drain_activity(self) -> dict[str, int]:
        """Rooms that published since the last call -> their last bus seq."""
        activity, self._activity = self._activity, {}
        return activity

    def apply_retention(self, now_ms: int | None = None) -> int:
        """Apply the store's retention now; returns the number of messages deleted."""
        return self.store.apply_retention(_now_ms() if now_ms is None else now_ms)

    def forget_idle_rooms(self) -> int:
        """Drop the rooms without members and without messages in flight from memory.

        Their rings go (replays then read the store); ids and bus seqs continue.
        Returns how many rooms were dropped.
        """
        idle = [name for name, st in self._states.items()
                if not st.pending and not st.room.members]
        for name in idle:
            del self._states[name]
            self.rooms.forget_idle(name)
        return len(idle)

    async def close(self) -> None:
        """Refuse new messages, commit (and publish) those accepted, close the store."""
        self._closing = True
        await self.store.close()
        # The commit notifications are scheduled on this loop: let them publish.
        await asyncio.sleep(0)

    # ------------------------------------------------------------ helpers
    def _bus(self, ctx: RequestContext) -> Bus | None:
        return self.bus if self.bus is not None else ctx.bus

    def _state(self, name: str) -> _RoomState:
        st = self._states.get(name)
        if st is None:
            if len(self._states) >= self._sweep_at:
                self.forget_idle_rooms()
                # Amortised: sweep again only once the table doubled (or reached the bound).
                self._sweep_at = max(self.config.rooms_in_memory, 2 * len(self._states))
            room = self.rooms.room(name)
            last_ts = 0
            if room.last_id:
                # Once per room and process: timestamps continue from the last stored one.
                last_ts = self.store.last_timestamp(name, room.last_id)
            st = self._states[name] = _RoomState(room, last_ts)
        return st

    def _check_owned(self, room: str) -> None:
        if self.owns is not None and not self.owns(room):
            raise RpcError(Status.FAILED_PRECONDITION,
                           f"room {room!r} belongs to another shard")

    def _name_error(self, kind: str, value: str, limit: int) -> str | None:
        if not value:
            return f"{kind} must not be empty"
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            return f"{kind} is not valid unicode"
        if size > limit:
            return f"{kind} is {size} bytes long; the limit is {limit}"
        if _CONTROL.search(value):
            return f"{kind} must not contain control characters"
        return None

    def _message_error(self, room: str, user: str, content: str, key: str = "") -> str | None:
        cfg = self.config
        err = (self._name_error("room", room, cfg.max_room_name)
               or self._name_error("user", user, cfg.max_user_name))
        if err:
            return err
        try:
            size = len(content.encode("utf-8"))
            key_size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            return "content or idempotency_key is not valid unicode"
        if size > cfg.max_content_bytes:
            return f"content is {size} bytes long; the limit is {cfg.max_content_bytes}"
        if key_size > MAX_KEY_BYTES:
            return f"idempotency_key is {key_size} bytes long; the limit is {MAX_KEY_BYTES}"
        return None

    def _check_names(self, room: str, user: str) -> None:
        cfg = self.config
        err = (self._name_error("room", room, cfg.max_room_name)
               or self._name_error("user", user, cfg.max_user_name))
        if err:
            raise RpcError(Status.INVALID_ARGUMENT, err)

    @staticmethod
    def _authorize(ctx: RequestContext, room: str) -> None:
        """PERMISSION_DENIED unless an authenticated caller's ``rooms`` claim allows ``room``."""
        if ctx.identity is not None:
            authorize_room(ctx, room)

    def _rate_error(self, user: str, wait: float, details: dict[str, Any] | None = None) -> RpcError:
        cfg = self.config
        ms = max(1, int(wait * 1000 + 0.999))
        return RpcError(Status.RESOURCE_EXHAUSTED,
                        f"rate limit: {user!r} may send {cfg.rate_per_s:g} messages/s "
                        f"(burst {cfg.rate_burst}, ChatConfig.rate_per_s/rate_burst); "
                        f"retry in {ms} ms", {**(details or {}), "retry_after_ms": ms})

    def _check_rate(self, user: str) -> None:
        """Unary sends: take a token or fail with RESOURCE_EXHAUSTED + retry_after_ms."""
        if self.limiter is not None:
            wait = self.limiter.try_take(user)
            if wait > 0:
                raise self._rate_error(user, wait)

    async def _pace(self, user: str, ctx: RequestContext,
                    details: dict[str, Any] | None = None) -> bool:
        """Streams: wait for the user's rate (backpressure), unless that would take too long.

        True when it waited (other calls ran meanwhile)."""
        limiter = self.limiter
        if limiter is None:
            return False
        wait = limiter.reserve(user)
        if wait <= 0:
            return False
        remaining = ctx.time_remaining()
        if wait * 1000 > self.config.rate_max_wait_ms or (remaining is not None and wait > remaining):
            limiter.refund(user)
            raise self._rate_error(user, wait, details)
        await asyncio.sleep(wait)  # pacing the sender to its rate, not a test delay
        return True

    # ------------------------------------------------------ message pipeline
    async def _duplicate(self, room: str, user: str, content: str, key: str) -> _Accepted | None:
        """The first send of ``key`` by ``user`` in ``room``, in flight or stored, or None.

        In flight: its state and message with a new waiter of this sender's own
        (resolved with the first send's); stored: the stored id and timestamp
        with an already completed waiter. The caller accepts a new message
        right after this returns None (no await between).
        """
        if not key:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        inflight = self._keys.get((room, user, key))
        if inflight is not None:
            return self._join_inflight(inflight, fut)
        found = await self.store.find_key_async(room, user, key)
        inflight = self._keys.get((room, user, key))  # accepted by a retry meanwhile?
        if inflight is not None:
            return self._join_inflight(inflight, fut)
        if found is None:
            return None
        fut.set_result(None)
        return self._state(room), StoredMessage(room, found[0], user, content, found[1], key), fut

    @staticmethod
    def _join_inflight(inflight: tuple[_RoomState, StoredMessage],
                       fut: asyncio.Future[None]) -> _Accepted:
        """A resent key whose first send is in flight: ``fut`` resolves with that send."""
        st, stored = inflight
        entry = st.pending.get(stored.id)
        if entry is not None:
            entry[4].append(fut)
        elif stored.id in st.lost:
            fut.set_exception(RpcError(Status.UNAVAILABLE, "message was not stored"))
        else:
            fut.set_result(None)
        return st, stored, fut

    async def _admit(self, room: str, user: str, content: str, bus: Bus | None, key: str,
                     ctx: RequestContext, *, paced: bool,
                     details: dict[str, Any] | None = None) -> _Accepted:
        """Take a validated message in: the first send of its idempotency key
        if there was one (not rate-limited again), else a new accepted send
        after the rate check (``paced``: wait for the rate, else refuse)."""
        dup = await self._duplicate(room, user, content, key)
        if dup is not None:
            return dup
        if not paced:
            self._check_rate(user)
        elif await self._pace(user, ctx, details):
            dup = await self._duplicate(room, user, content, key)  # sent meanwhile by a retry?
            if dup is not None:
                return dup
        return self._accept(room, user, content, bus, key)

    def _accept(self, room: str, user: str, content: str, bus: Bus | None,
                key: str = "") -> _Accepted:
        """Assign id + timestamp and queue the row, in one synchronous step
        (validated input whose key, if any, is not a duplicate).

        The sender gets its own waiter, resolved in id order by
        :meth:`_committed`; the store's future is never awaited by a handler,
        so a cancelled sender cancels only its waiter, never the commit.
        """
        if self._closing:
            raise RpcError(Status.UNAVAILABLE, "the chat service is shutting down")
        st = self._state(room)
        now = _now_ms()
        ts = now if now > st.last_ts else st.last_ts
        st.last_ts = ts
        stored = self.rooms.next_message(room, user, content, ts, key)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        st.pending[stored.id] = [stored, bus, None, None, [waiter]]
        fut = self.store.append_nowait(stored)
        fut.add_done_callback(functools.partial(self._committed, st, stored.id))
        if key:
            # until committed (then the store answers) or failed (then a retry stores it)
            k = (room, user, key)
            self._keys[k] = (st, stored)
            fut.add_done_callback(lambda _f: self._keys.pop(k, None))
        return st, stored, waiter

    def _committed(self, st: _RoomState, mid: int, fut: asyncio.Future[None]) -> None:
        """A row's commit resolved: publish every message that is now next in id order."""
        entry = st.pending.get(mid)
        if entry is None:
            return
        entry[2] = RuntimeError("the commit was cancelled") if fut.cancelled() else fut.exception()
        entry[3] = entry[2] is None
        pending = st.pending
        while True:
            entry = pending.get(st.next_pub)
            if entry is None or entry[3] is None:
                break
            stored, bus, error, ok, waiters = entry
            del pending[st.next_pub]
            if ok:
                self._emit(st, bus, stored.room, functools.partial(_message_event, stored))
            else:
                st.lost.add(stored.id)
            st.resolved = st.next_pub
            st.next_pub += 1
            for waiter in waiters:
                if waiter.done():  # that sender was cancelled
                    continue
                if ok:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(
                        RpcError(Status.UNAVAILABLE, f"message was not stored: {error}"))

    def _emit(self, st: _RoomState, bus: Bus | None, room: str,
              make: Callable[[int], ChatResponse]) -> int:
        """Number an event with the room's next bus seq, keep it in the ring, publish it."""
        seq = st.room.bus_seq + 1
        payload = encode(make(seq))
        got = self.rooms.record_event(room, payload)
        assert got == seq, (got, seq)
        self._activity[room] = seq
        if bus is not None:
            try:
                bus.publish(room, seq, payload)
            except Exception:  # a broken bus must not break the room's sequencing
                log.exception("publishing event %d of room %r failed", seq, room)
        return seq

    @staticmethod
    async def _settle(waiter: asyncio.Future[None]) -> None:
        """Wait on a sender's waiter: its message is committed and published
        (raises UNAVAILABLE if it was not stored)."""
        await waiter

    async def _finish(self, accepted: _Accepted) -> StoredMessage:
        """The message of an accepted send once it is committed and published."""
        await self._settle(accepted[2])
        return accepted[1]

    # ------------------------------------------------------------ presence
    def _admit_presence(self, call: ServerCall, user: str) -> str | None:
        """Count the stream's user against the presence caps; the IP counted (see _leave)."""
        ctx = call.context
        ip = client_ip(ctx.peer) if ctx.identity is None else None
        why = self.presence.admit(call.session, ip, user)
        if why is not None:
            raise RpcError(Status.RESOURCE_EXHAUSTED, why)
        return ip

    def _join(self, room: str, user: str, bus: Bus | None) -> None:
        st = self._state(room)
        if self.rooms.join(room, user, _now_ms()):
            self._emit(st, bus, room, functools.partial(ChatResponse.user_joined_response, user))

    def _leave(self, room: str, user: str, bus: Bus | None, call: ServerCall, ip: str | None) -> None:
        self.presence.release(call.session, ip, user)
        if self.rooms.leave(room, user):
            self._emit(self._state(room), bus, room,
                       functools.partial(ChatResponse.user_left_response, user))

    # ------------------------------------------------------------ handlers
    async def send_message(self, request: Message, ctx: RequestContext) -> ChatResponse:
        """``Chat/SendMessage``: store, publish once, then ack with the stored message."""
        user = ctx.identity or request.user
        key = request.idempotency_key
        err = self._message_error(request.room, user, request.content, key)
        if err:
            raise RpcError(Status.INVALID_ARGUMENT, err)
        self._authorize(ctx, request.room)
        self._check_owned(request.room)
        accepted = await self._admit(request.room, user, request.content, self._bus(ctx), key,
                                     ctx, paced=False)
        stored = await self._finish(accepted)
        return ChatResponse.ack_response(_to_message(stored))

    async def send_message_batch(self, call: ServerCall) -> BatchSummary:
        """``Chat/SendMessageBatch``: every message as if sent alone; a summary at the end.

        Messages of owned rooms are pipelined (queued for commit without
        waiting for the previous one); an invalid message ends the call with
        INVALID_ARGUMENT naming its 0-based index, after the messages before
        it are durable.
        """
        ctx = call.context
        bus = self._bus(ctx)
        inflight: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        users: dict[str, None] = {}
        total_chars = 0
        index = 0

        async def settle(item: tuple[int, asyncio.Future[None]]) -> None:
            i, waiter = item
            try:
                await self._settle(waiter)
            except RpcError as exc:
                raise RpcError(exc.status, f"message {i}: {exc.message}", {"index": i}) from None

        try:
            while True:
                try:
                    m = await call.recv()
                except DecodeError as exc:
                    raise RpcError(Status.INVALID_ARGUMENT, f"message {index}: {exc}",
                                   {"index": index}) from None
                if m is None:
                    break
                user = ctx.identity or m.user
                key = m.idempotency_key
                err = self._message_error(m.room, user, m.content, key)
                if err:
                    raise RpcError(Status.INVALID_ARGUMENT, f"message {index}: {err}",
                                   {"index": index})
                try:
                    self._authorize(ctx, m.room)
                except RpcError as exc:
                    raise RpcError(exc.status, f"message {index}: {exc.message}",
                                   {"index": index}) from None
                if self.owns is None or self.owns(m.room):
                    accepted = await self._admit(m.room, user, m.content, bus, key, ctx,
                                                 paced=True, details={"index": index})
                    inflight.append((index, accepted[2]))
                    if len(inflight) > self.config.max_batch_inflight:
                        await settle(inflight.popleft())
                else:
                    await self._pace(user, ctx, {"index": index})
                    if self.forward is None:
                        raise RpcError(Status.FAILED_PRECONDITION,
                                       f"message {index}: room {m.room!r} belongs to another shard",
                                       {"index": index})
                    try:
                        await self.forward(Message(user=user, content=m.content, room=m.room,
                                                   idempotency_key=key))
                    except RpcError as exc:
                        raise RpcError(exc.status, f"message {index}: {exc.message}",
                                       {"index": index}) from None
                users.setdefault(user, None)
                total_chars += len(m.content)
                index += 1
        finally:
            # Whatever happens, the messages accepted so far are durable before we answer.
            while inflight:
                await settle(inflight.popleft())
        return BatchSummary(total_messages=index, total_characters=total_chars,
                            users=list(users), timestamp=_now_ms())

    async def subscribe_to_room(self, request: SubscribeRequest, call: ServerCall) -> None:
        """``Chat/SubscribeToRoom``: optional history, then live events until the client leaves."""
        ctx = call.context
        room = request.room
        user = ctx.identity or request.user
        self._check_names(room, user)
        self._authorize(ctx, room)
        self._check_since(request.since_id, request.since_timestamp, "since_id", "since_timestamp")
        self._check_owned(room)
        bus = self._bus(ctx)
        if not await self._attach(call, room, request.since_id, request.since_timestamp):
            return
        ip = self._admit_presence(call, user)  # no suspension from here to the join
        # Still the same step as the attach: the stream sees its own user_joined.
        self._join(room, user, bus)
        try:
            await call.wait_closed()
        finally:
            self._leave(room, user, bus, call, ip)

    async def join_chat(self, call: ServerCall) -> None:
        """``Chat/JoinChat``: a join message, then messages both ways until either side ends."""
        ctx = call.context
        try:
            join = await call.recv()
        except DecodeError as exc:
            raise RpcError(Status.INVALID_ARGUMENT, f"join message: {exc}") from None
        if join is None:
            raise RpcError(Status.INVALID_ARGUMENT, "JoinChat expects a join message first")
        room = join.room
        user = ctx.identity or join.user
        self._check_names(room, user)
        self._authorize(ctx, room)
        self._check_since(join.id, join.timestamp, "the join message's id",
                          "the join message's timestamp")
        self._check_owned(room)
        bus = self._bus(ctx)
        await call.send(ChatResponse.ack_response())
        # A join whose id or timestamp is > 0 resumes: the messages after it come first.
        if not await self._attach(call, room, join.id or None,
                                  join.timestamp if join.timestamp > 0 else None):
            return
        ip = self._admit_presence(call, user)
        self._join(room, user, bus)
        sending: asyncio.Future[StoredMessage] | None = None
        try:
            while True:
                try:
                    m = await call.recv()
                except DecodeError as exc:
                    await call.send(ChatResponse.error_response(f"undecodable message: {exc}"))
                    continue
                if m is None:
                    break
                if m.room and m.room != room:
                    await call.send(ChatResponse.error_response(
                        f"this stream is joined to room {room!r}, not {m.room!r}"))
                    continue
                key = m.idempotency_key
                err = self._message_error(room, user, m.content, key)
                if err:
                    await call.send(ChatResponse.error_response(err))
                    continue
                accepted = await self._admit(room, user, m.content, bus, key, ctx, paced=True)
                # shielded: if the stream ends meanwhile, the message still completes (it is
                # committed and published) and the user's leave is announced after it
                sending = asyncio.ensure_future(self._finish(accepted))
                stored = await asyncio.shield(sending)
                await call.send(ChatResponse.ack_response(_to_message(stored)))
        finally:
            if sending is not None and not sending.done():
                def leave_after(f: asyncio.Future[StoredMessage]) -> None:
                    if not f.cancelled():
                        f.exception()  # retrieved: the sender is gone, nobody else will read it
                    self._leave(room, user, bus, call, ip)
                sending.add_done_callback(leave_after)
            else:
                self._leave(room, user, bus, call, ip)

    async def list_users(self, request: ListUsersRequest, ctx: RequestContext) -> ListUsersResponse:
        """``Chat/ListUsers``: who is present in the room (by join time)."""
        err = self._name_error("room", request.room, self.config.max_room_name)
        if err:
            raise RpcError(Status.INVALID_ARGUMENT, err)
        self._authorize(ctx, request.room)
        self._check_owned(request.room)
        users = [User(name=m.name, joined_at=m.joined_at, message_count=m.message_count)
                 for m in self.rooms.members(request.room)]
        return ListUsersResponse(room=request.room, users=users)

    # ------------------------------------------------------------ replay
    @staticmethod
    def _check_since(since_id: int | None, since_ts: int | None, id_name: str,
                     ts_name: str) -> None:
        if since_id is not None and since_id < 0:
            raise RpcError(Status.INVALID_ARGUMENT, f"{id_name} must be >= 0")
        if since_ts is not None and not -2**63 <= since_ts < 2**63:
            # (SQLite integers are 64-bit: a larger value would fail the history read)
            raise RpcError(Status.INVALID_ARGUMENT, f"{ts_name} must fit in 64 bits")

    async def _attach(self, call: ServerCall, room: str, since_id: int | None,
                      since_ts: int | None) -> bool:
        """Attach ``call`` to the room's live events, after replaying the messages
        after ``since_id`` / ``since_timestamp`` when either is given. False
        when the stream ended meanwhile."""
        if since_id is None and since_ts is None:
            call.attach(room, self._state(room).room.bus_seq)
            return True
        after = since_id or 0
        if since_ts is not None:
            after = max(after, await self._id_before(room, since_ts))
        return await self._replay_then_attach(call, room, after)

    async def _id_before(self, room: str, since_ts: int) -> int:
        """An id ``k`` such that the messages with ``timestamp > since_ts`` are those with id > k.

        Exact because timestamps never decrease within a room.
        """
        st = self._state(room)
        ring = st.room.recent
        if ring and ring[0].timestamp <= since_ts:
            for m in ring:  # the ring reaches back past since_ts
                if m.timestamp > since_ts:
                    return m.id - 1
            return st.room.last_id
        if not st.room.last_id:
            return 0
        resolved = st.resolved  # before the read: ids above it are replayed by id anyway
        rows = await asyncio.to_thread(self.store.read, room, after_timestamp=since_ts, limit=1)
        if rows:
            return min(rows[0].id - 1, resolved)
        return resolved

    async def _replay_then_attach(self, call: ServerCall, room: str, after: int) -> bool:
        """Send the messages with id > ``after``, then attach (see the module docstring).

        False when the stream ended meanwhile.
        """
        page = self.config.history_page
        while True:
            st = self._state(room)
            upto = st.resolved  # snapshot: (upto, bus_seq) with no await in between
            if after >= upto:
                call.attach(room, st.room.bus_seq)
                return True
            recent = self.rooms.recent_after(room, after)
            if recent is not None:
                lost = st.lost
                batch = [m for m in recent if m.id <= upto and (not lost or m.id not in lost)]
                next_after = upto
            else:
                rows = await asyncio.to_thread(self.store.read, room, after_id=after, limit=page)
                batch = [m for m in rows if m.id <= upto]
                full = len(rows) == page and len(batch) == len(rows)
                next_after = batch[-1].id if full else upto
            for m in batch:
                # No suspension while the client has credit: a tail from the ring is
                # typically sent, re-snapshotted and attached in one step.
                await call.send(ChatResponse.message_response(_to_message(m)))
            if call.io.error is not None:
                return False
            after = next_after
