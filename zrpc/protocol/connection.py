"""The connection state machine: bytes in, events out, bytes to send.

One :class:`Connection` is one end of a zrpc connection, client or server
role. It validates every frame against the stream transition table
(:mod:`zrpc.protocol.streams`), enforces flow-control windows in both
directions and the limits in :class:`Settings`, and queues the frames to send;
``data_to_send()`` hands them out coalesced. It never raises on bad input
from the peer: a connection-level violation queues a GOAWAY and returns a
:class:`ConnectionTerminated` event, a stream-level one queues a RESET.
Local misuse (sending on a closed stream, overrunning credit) raises.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

from zrpc import defaults
from zrpc.packing import packb
from zrpc.protocol.events import (
    ConnectionTerminated,
    Event,
    GoAwayReceived,
    HelloReceived,
    MessageReceived,
    PingAcked,
    StatusReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from zrpc.protocol.frames import (
    CONTROL_FRAME_LIMIT,
    HEADER,
    MAX_STREAM_ID,
    FrameDecoder,
    FrameFlag,
    FrameType,
)
from zrpc.protocol.streams import TRANSITIONS, StreamEvent, StreamState
from zrpc.status import ProtocolError, RpcError, Status, StreamClosed

__all__ = ["PROTOCOL_VERSION", "Connection", "FlowControlBlocked", "Role", "Settings"]

PROTOCOL_VERSION = 1
MAX_WINDOW = 2**31 - 1

_pack_header = HEADER.pack
_u32 = struct.Struct("!I")
_T_HELLO = int(FrameType.HELLO)
_T_OPEN = int(FrameType.OPEN)
_T_MESSAGE = int(FrameType.MESSAGE)
_T_END = int(FrameType.END)
_T_STATUS = int(FrameType.STATUS)
_T_RESET = int(FrameType.RESET)
_T_WINDOW = int(FrameType.WINDOW)
_T_PING = int(FrameType.PING)
_T_PONG = int(FrameType.PONG)
_T_GOAWAY = int(FrameType.GOAWAY)
_F_COMPRESSED = int(FrameFlag.COMPRESSED)
_F_END = int(FrameFlag.END_STREAM)
_S = StreamState
_E = StreamEvent


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True)
class Settings:
    """What one end announces in its HELLO and enforces on what it receives."""

    max_message_size: int = defaults.MAX_MESSAGE_SIZE
    max_concurrent_streams: int = defaults.MAX_CONCURRENT_STREAMS
    initial_stream_window: int = defaults.STREAM_WINDOW
    initial_connection_window: int = defaults.CONNECTION_WINDOW
    max_metadata_size: int = defaults.MAX_METADATA_SIZE
    keepalive_interval_ms: int | None = None  # send PING after this much silence
    keepalive_timeout_ms: int = defaults.KEEPALIVE_TIMEOUT_MS  # PONG must come back within this

    def __post_init__(self) -> None:
        for name in ("max_message_size", "max_concurrent_streams", "initial_stream_window",
                     "initial_connection_window", "max_metadata_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Settings.{name} must be a positive integer, got {value!r}")
        if self.initial_stream_window > MAX_WINDOW or self.initial_connection_window > MAX_WINDOW:
            raise ValueError(f"windows must be at most {MAX_WINDOW}")
        if self.max_metadata_size > CONTROL_FRAME_LIMIT:
            raise ValueError(f"max_metadata_size must be at most {CONTROL_FRAME_LIMIT}")

    def announce(self) -> dict[str, Any]:
        """The HELLO fields this end sends."""
        d = asdict(self)
        d.pop("keepalive_interval_ms")
        d.pop("keepalive_timeout_ms")
        return d


class FlowControlBlocked(Exception):
    """``send_message`` was called without credit; wait for WindowUpdated."""


class _Stream:
    __slots__ = ("id", "recv_window", "send_window", "state", "unacked")

    def __init__(self, sid: int, send_window: int, recv_window: int) -> None:
        self.id = sid
        self.state = _S.OPEN
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacked = 0


def _peer_int(settings: dict[str, Any], key: str, low: int, high: int) -> int:
    value = settings.get(key)
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"HELLO field {key!r} must be an integer in [{low}, {high}], got {value!r}",
                            Status.INVALID_ARGUMENT)
    return value


class Connection:
    """One end of a zrpc connection (see module docstring)."""

    def __init__(self, role: Role, settings: Settings | None = None, *,
                 peer_settings: dict[str, Any] | None = None, now: float = 0.0) -> None:
        self.role = role
        self.is_client = role is Role.CLIENT
        self.local = settings or Settings()
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.hello_sent = False
        self.peer: dict[str, Any] | None = None
        self.goaway_received: int | None = None  # last stream id the peer will process
        self.goaway_sent: int | None = None
        self.output_paused = False  # see pause_output
        self._out = bytearray()
        self._decoder = FrameDecoder(self.local.max_message_size, CONTROL_FRAME_LIMIT)
        self._send_conn_window = 0
        self._peer_stream_window = 0
        self._peer_max_message = 0
        self._peer_max_streams = 0
        self._recv_conn_window = self.local.initial_connection_window
        self._conn_unacked = 0
        self._highest_id = 0     # highest stream id opened (by the client)
        self._next_id = 1
        self.last_received = now
        self._ping_sent_at: float | None = None
        self._ping_counter = 0
        self._early_pongs = bytearray()  # PONGs owed before our HELLO was sent
        #: False over QUIC (:mod:`zrpc.protocol.quic`): each stream's OPEN comes on its own QUIC
        #: stream, so OPENs of different streams may arrive in any order; the QUIC framing
        #: guarantees each id is opened at most once.
        self.stream_ids_in_order = True
        if peer_settings is not None:
            self._apply_peer(peer_settings)

    # ------------------------------------------------------------------ input
    def receive_data(self, data: bytes, now: float | None = None) -> list[Event]:
        """Feed received bytes; returns the events they complete."""
        if self.closed:
            return []
        if now is not None:
            self.last_received = now
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            # drop what the failed feed buffered (it can be far above any frame limit)
            self._decoder = FrameDecoder(self.local.max_message_size, CONTROL_FRAME_LIMIT)
            return [self._fail(exc)]
        events: list[Event] = []
        for ftype, flags, sid, payload in frames:
            try:
                if ftype == _T_MESSAGE:
                    self._on_message(events, flags, sid, payload)
                elif ftype == _T_WINDOW:
                    self._on_window(events, sid, payload)
                elif self.peer is None and ftype != _T_HELLO and not (self.is_client and ftype == _T_GOAWAY):
                    raise ProtocolError(f"{FrameType(ftype).name} frame before HELLO", Status.INTERNAL)
                elif ftype == _T_OPEN:
                    self._on_open(events, sid, payload)
                elif ftype == _T_END:
                    self._on_end(events, sid)
                elif ftype == _T_STATUS:
                    self._on_status(events, sid, payload)
                elif ftype == _T_RESET:
                    self._on_reset(events, sid, payload)
                elif ftype == _T_PING:
                    self._on_ping(sid, payload)
                elif ftype == _T_PONG:
                    self._on_pong(events, payload)
                elif ftype == _T_GOAWAY:
                    self._on_goaway(events, payload)
                else:  # HELLO
                    self._on_hello(events, sid, payload)
            except ProtocolError as exc:
                events.append(self._fail(exc))
                break
            if self.closed:
                break
        return events

    def _fail(self, exc: ProtocolError) -> ConnectionTerminated:
        self.close(exc.code, str(exc))
        return ConnectionTerminated(int(exc.code), str(exc))

    def _was_opened(self, sid: int) -> bool:
        return 0 < sid <= (self._next_id - 2 if self.is_client else self._highest_id)

    def _lookup(self, sid: int, what: str) -> _Stream | None:
        st = self.streams.get(sid)
        if st is None and not self._was_opened(sid):
            raise ProtocolError(f"{what} on stream {sid}, which was never opened", Status.INTERNAL)
        return st  # None: a stream that already closed; late frames are ignored

    def _step(self, st: _Stream, event: StreamEvent) -> bool:
        new = TRANSITIONS.get((st.state, event))
        if new is None:
            self._reset(st.id, Status.INTERNAL, f"{event.value} not allowed in state {st.state.value}")
            return False
        st.state = new
        return True

    def _on_message(self, events: list[Event], flags: int, sid: int, payload: bytes) -> None:
        size = len(payload)
        if self._recv_conn_window <= 0:
            raise ProtocolError("connection flow-control window exceeded", Status.RESOURCE_EXHAUSTED)
        self._recv_conn_window -= size
        st = self._lookup(sid, "MESSAGE")
        if st is None:
            self._ack_connection(size)
            return
        if st.recv_window <= 0:
            raise ProtocolError(f"stream {sid} flow-control window exceeded", Status.RESOURCE_EXHAUSTED)
        st.recv_window -= size
        if not self._step(st, _E.RECV_MESSAGE):
            self._ack_connection(size)
            events.append(StreamReset(sid, Status.INTERNAL, "message in a half-closed stream"))
            return
        end = bool(flags & _F_END)
        events.append(MessageReceived(sid, payload, bool(flags & _F_COMPRESSED), end))
        if end:
            self._recv_end(events, st)

    def _recv_end(self, events: list[Event], st: _Stream) -> None:
        if self.is_client:
            raise ProtocolError("server sent END; a server ends a stream with STATUS", Status.INTERNAL)
        if self._step(st, _E.RECV_END):
            events.append(StreamEnded(st.id))
        else:
            events.append(StreamReset(st.id, Status.INTERNAL, "END in a half-closed stream"))

    def _on_end(self, events: list[Event], sid: int) -> None:
        st = self._lookup(sid, "END")
        if st is not None:
            self._recv_end(events, st)

    def _on_window(self, events: list[Event], sid: int, payload: bytes) -> None:
        if self.peer is None:
            raise ProtocolError("WINDOW frame before HELLO", Status.INTERNAL)
        if len(payload) != 4:
            raise ProtocolError("WINDOW payload must be 4 bytes", Status.INTERNAL)
        (inc,) = _u32.unpack(payload)
        if inc == 0:
            raise ProtocolError("WINDOW increment of 0", Status.INTERNAL)
        if sid == 0:
            self._send_conn_window += inc
            if self._send_conn_window > MAX_WINDOW:
                raise ProtocolError("connection window above 2^31-1", Status.RESOURCE_EXHAUSTED)
        else:
            st = self._lookup(sid, "WINDOW")
            if st is None:
                return
            st.send_window += inc
            if st.send_window > MAX_WINDOW:
                raise ProtocolError(f"stream {sid} window above 2^31-1", Status.RESOURCE_EXHAUSTED)
        events.append(WindowUpdated(sid))

    def _on_hello(self, events: list[Event], sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ProtocolError("HELLO on a stream", Status.INTERNAL)
        if self.peer is not None and not self.is_client:
            raise ProtocolError("second HELLO", Status.INTERNAL)
        settings = _unpack_control(payload, "HELLO", any_keys=True)
        if not isinstance(settings, dict):  # a non-map, or a map with a key that is not a string
            raise ProtocolError("HELLO payload must be a map with string keys", Status.INVALID_ARGUMENT)
        version = settings.get("version")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported protocol version {version!r}; this end speaks "
                                f"{PROTOCOL_VERSION}", Status.FAILED_PRECONDITION)
        self._apply_peer(settings)
        events.append(HelloReceived(settings))

    def _apply_peer(self, settings: dict[str, Any]) -> None:
        stream_window = _peer_int(settings, "initial_stream_window", 1, MAX_WINDOW)
        conn_window = _peer_int(settings, "initial_connection_window", 1, MAX_WINDOW)
        self._peer_max_message = _peer_int(settings, "max_message_size", 1, 2**32 - 1)
        self._peer_max_streams = _peer_int(settings, "max_concurrent_streams", 1, 2**31 - 1)
        _peer_int(settings, "max_metadata_size", 1, CONTROL_FRAME_LIMIT)
        first = self.peer is None
        self.peer = settings
        if first:
            self._send_conn_window = conn_window
            self._peer_stream_window = stream_window
            for st in self.streams.values():
                st.send_window = stream_window

    def _on_open(self, events: list[Event], sid: int, payload: bytes) -> None:
        if self.is_client:
            raise ProtocolError("server sent OPEN", Status.INTERNAL)
        if sid % 2 == 0 or (sid <= self._highest_id and (self.stream_ids_in_order or sid in self.streams)):
            raise ProtocolError(f"OPEN with stream id {sid}: ids must be odd and increasing",
                                Status.INTERNAL)
        if sid > self._highest_id:
            self._highest_id = sid
        if self.goaway_sent is not None and sid > self.goaway_sent:
            self._queue_control(_T_RESET, sid, [int(Status.UNAVAILABLE), "server is shutting down"])
            return
        if len(self.streams) >= self.local.max_concurrent_streams:
            self._queue_control(_T_RESET, sid, [int(Status.RESOURCE_EXHAUSTED),
                                                f"max_concurrent_streams ({self.local.max_concurrent_streams}) reached"])
            return
        if len(payload) > self.local.max_metadata_size:
            self._queue_control(_T_RESET, sid, [int(Status.RESOURCE_EXHAUSTED),
                                                f"OPEN of {len(payload)} bytes exceeds max_metadata_size "
                                                f"({self.local.max_metadata_size})"])
            return
        try:
            body = _unpack_control(payload, "OPEN")
            method, timeout_ms, metadata = body
            if not isinstance(method, str) or not method:
                raise TypeError("method must be a non-empty string")
            if timeout_ms is not None and (type(timeout_ms) is not int or not 0 <= timeout_ms < 2**40):
                raise TypeError("timeout must be null or a non-negative integer")
            if not isinstance(metadata, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise TypeError("metadata must map strings to strings")
        except (ProtocolError, TypeError, ValueError) as exc:
            self._queue_control(_T_RESET, sid, [int(Status.INVALID_ARGUMENT), f"malformed OPEN: {exc}"])
            return
        self.streams[sid] = _Stream(sid, self._peer_stream_window, self.local.initial_stream_window)
        events.append(StreamOpened(sid, method, timeout_ms, metadata))

    def _on_status(self, events: list[Event], sid: int, payload: bytes) -> None:
        if not self.is_client:
            raise ProtocolError("client sent STATUS", Status.INTERNAL)
        st = self._lookup(sid, "STATUS")
        code, message, details = _triple(payload, "STATUS")
        if st is None:
            return
        if not self._step(st, _E.RECV_STATUS):  # pragma: no cover - every client state allows it
            return
        del self.streams[sid]
        events.append(StatusReceived(sid, code, message, details))

    def _on_reset(self, events: list[Event], sid: int, payload: bytes) -> None:
        st = self._lookup(sid, "RESET")
        code, message, _ = _triple(payload, "RESET", two=True)
        if st is None:
            return
        del self.streams[sid]
        events.append(StreamReset(sid, code, message))

    def _on_ping(self, sid: int, payload: bytes) -> None:
        if sid != 0 or len(payload) != 8:
            raise ProtocolError("PING must be on stream 0 with 8 bytes", Status.INTERNAL)
        if self.hello_sent:
            self._out += _pack_header(8, _T_PONG, 0, 0) + payload
        else:  # pipelined right behind the peer's HELLO: our HELLO must go out first
            self._early_pongs += _pack_header(8, _T_PONG, 0, 0) + payload

    def _on_pong(self, events: list[Event], payload: bytes) -> None:
        if len(payload) != 8:
            raise ProtocolError("PONG must carry 8 bytes", Status.INTERNAL)
        self._ping_sent_at = None
        events.append(PingAcked(payload))

    def _on_goaway(self, events: list[Event], payload: bytes) -> None:
        body = _unpack_control(payload, "GOAWAY")
        if (not isinstance(body, list) or len(body) != 3 or type(body[0]) is not int
                or body[0] < 0 or type(body[1]) is not int or not isinstance(body[2], str)):
            raise ProtocolError("GOAWAY payload must be [last_stream_id, code, message]", Status.INTERNAL)
        self.goaway_received = body[0]
        events.append(GoAwayReceived(body[0], body[1], body[2]))

    # ----------------------------------------------------------------- output
    def data_to_send(self) -> bytes:
        """Everything queued to send, coalesced; empties the queue."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    @property
    def bytes_to_send(self) -> int:
        """How many bytes are queued for ``data_to_send``."""
        return len(self._out)

    @property
    def highest_stream_id(self) -> int:
        """Server: the highest stream id the client has opened so far (0: none yet)."""
        return self._highest_id

    def send_hello(self, extra: dict[str, Any] | None = None) -> None:
        """Announce our settings (the client first; the server to accept the client)."""
        if self.hello_sent:
            raise RuntimeError("HELLO already sent")
        body = {"version": PROTOCOL_VERSION, **self.local.announce(), **(extra or {})}
        self._queue_control(_T_HELLO, 0, body)
        self.hello_sent = True
        if self._early_pongs:
            self._out += self._early_pongs
            self._early_pongs.clear()

    def _queue_control(self, ftype: int, sid: int, body: Any) -> None:
        payload = packb(body)
        self._out += _pack_header(len(payload), ftype, 0, sid)
        self._out += payload

    @property
    def can_open_stream(self) -> bool:
        return (self.peer is not None and not self.closed and self.goaway_received is None
                and len(self.streams) < self._peer_max_streams)

    def open_stream(self, method: str, metadata: dict[str, str] | None = None,
                    timeout_ms: int | None = None) -> int:
        """Client: open a stream; returns its id."""
        if not self.is_client:
            raise RuntimeError("only a client opens streams")
        if self.closed or self.goaway_received is not None:
            raise RpcError(Status.UNAVAILABLE, "connection is closing")
        if self.peer is None:
            raise RuntimeError("open_stream before the peer's HELLO")
        if len(self.streams) >= self._peer_max_streams:
            raise RpcError(Status.RESOURCE_EXHAUSTED,
                           f"peer's max_concurrent_streams ({self._peer_max_streams}) reached")
        sid = self._next_id
        if sid > MAX_STREAM_ID:  # the peer would treat the id as a connection error
            raise RpcError(Status.UNAVAILABLE, "stream ids exhausted on this connection; open a new one")
        self._next_id += 2
        payload = packb([method, timeout_ms, metadata or {}])
        if len(payload) > CONTROL_FRAME_LIMIT:
            self._next_id -= 2
            raise RpcError(Status.INVALID_ARGUMENT, f"method and metadata take {len(payload)} bytes; "
                                                     f"the limit is {CONTROL_FRAME_LIMIT}")
        self._out += _pack_header(len(payload), _T_OPEN, 0, sid)
        self._out += payload
        self.streams[sid] = _Stream(sid, self._peer_stream_window, self.local.initial_stream_window)
        return sid

    def _live(self, sid: int) -> _Stream:
        st = self.streams.get(sid)
        if st is None:
            raise StreamClosed(f"stream {sid} is closed")
        return st

    def send_credit(self, sid: int) -> int:
        """How many bytes may be sent now on ``sid`` (<= 0: wait for WindowUpdated)."""
        st = self.streams.get(sid)
        if st is None:
            raise StreamClosed(f"stream {sid} is closed")
        if (st.state, _E.SEND_MESSAGE) not in TRANSITIONS:
            raise StreamClosed(f"cannot send on stream {sid} in state {st.state.value}")
        if self.output_paused:
            return 0
        return min(st.send_window, self._send_conn_window)

    def pause_output(self) -> None:
        """The transport cannot take more for now: no stream has credit until :meth:`resume_output`.

        Whatever windows the peer announced, messages then wait in their
        senders' queues (where they are counted against the buffer budgets)
        instead of piling up in the transport. Control frames still queue.
        """
        self.output_paused = True

    def resume_output(self) -> None:
        """The transport drained: credit is back (the caller wakes its blocked senders)."""
        self.output_paused = False

    @property
    def peer_max_message_size(self) -> int:
        """The peer's announced ``max_message_size`` (0 before its HELLO)."""
        return self._peer_max_message

    def oversize(self, size: int) -> str | None:
        """Why a message of ``size`` bytes may not be sent to the peer (None: it may).

        The peer announced ``max_message_size`` in its HELLO; a larger message
        would be a connection error there, so the stream must end instead.
        """
        if size > self._peer_max_message:
            return (f"message of {size} bytes exceeds the peer's max_message_size "
                    f"({self._peer_max_message})")
        return None

    def send_message(self, sid: int, payload: bytes, *, end_stream: bool = False,
                     compressed: bool = False) -> None:
        """Queue one message. Requires ``send_credit(sid) > 0`` (may overshoot by one message).

        Raises RpcError RESOURCE_EXHAUSTED when the message exceeds the peer's
        ``max_message_size`` (see :meth:`oversize`); nothing is queued then.
        """
        st = self._live(sid)
        size = len(payload)
        if size > self._peer_max_message:
            raise RpcError(Status.RESOURCE_EXHAUSTED, self.oversize(size) or "")
        if st.send_window <= 0 or self._send_conn_window <= 0:
            raise FlowControlBlocked(sid)
        new = TRANSITIONS.get((st.state, _E.SEND_MESSAGE))
        if new is None:
            raise StreamClosed(f"cannot send on stream {sid} in state {st.state.value}")
        flags = (_F_COMPRESSED if compressed else 0)
        if end_stream:
            if not self.is_client:
                raise RuntimeError("a server ends a stream with send_status")
            new = TRANSITIONS[(new, _E.SEND_END)]
            flags |= _F_END
        st.state = new
        st.send_window -= size
        self._send_conn_window -= size
        self._out += _pack_header(size, _T_MESSAGE, flags, sid)
        self._out += payload

    def end_stream(self, sid: int) -> None:
        """Client: half-close (no more messages from us)."""
        st = self._live(sid)
        new = TRANSITIONS.get((st.state, _E.SEND_END)) if self.is_client else None
        if new is None:
            raise StreamClosed(f"cannot end stream {sid} in state {st.state.value}")
        st.state = new
        self._out += _pack_header(0, _T_END, 0, sid)

    def send_status(self, sid: int, code: int, message: str = "", details: Any = None) -> None:
        """Server: end the stream with a status."""
        st = self._live(sid)
        if self.is_client or TRANSITIONS.get((st.state, _E.SEND_STATUS)) is None:
            raise StreamClosed(f"cannot send STATUS on stream {sid} in state {st.state.value}")
        del self.streams[sid]
        self._queue_control(_T_STATUS, sid, [int(code), message, details])

    def reset_stream(self, sid: int, code: int, message: str = "") -> None:
        """Abort a stream (either side). No-op for a stream that is already closed."""
        if sid in self.streams:
            self._reset(sid, code, message)

    def _reset(self, sid: int, code: int, message: str) -> None:
        self.streams.pop(sid, None)
        self._queue_control(_T_RESET, sid, [int(code), message])

    def acknowledge(self, sid: int, size: int) -> None:
        """The application consumed ``size`` bytes of ``sid``: return that credit.

        WINDOW frames are sent once a quarter of the window is consumed.
        """
        self._ack_connection(size)
        st = self.streams.get(sid)
        if st is None:
            return
        st.unacked += size
        # "st.unacked and": a window below 4 bytes has a threshold of 0; never send an increment of 0
        if (st.unacked and st.unacked >= self.local.initial_stream_window >> 2
                and st.state in (_S.OPEN, _S.HALF_CLOSED_LOCAL)):
            inc = st.unacked
            st.unacked = 0
            st.recv_window += inc
            self._out += _pack_header(4, _T_WINDOW, 0, sid) + _u32.pack(inc)

    def _ack_connection(self, size: int) -> None:
        self._conn_unacked += size
        if self._conn_unacked and self._conn_unacked >= self.local.initial_connection_window >> 2:
            inc = self._conn_unacked
            self._conn_unacked = 0
            self._recv_conn_window += inc
            self._out += _pack_header(4, _T_WINDOW, 0, 0) + _u32.pack(inc)

    def goaway(self, code: int = Status.OK, message: str = "") -> None:
        """Graceful shutdown: streams already opened finish, new ones are refused."""
        if self.goaway_sent is None and not self.closed:
            self.goaway_sent = self._highest_id if not self.is_client else 0
            self._queue_control(_T_GOAWAY, 0, [self.goaway_sent, int(code), message])

    def close(self, code: int = Status.OK, message: str = "") -> None:
        """Close now: a final GOAWAY; every stream is gone."""
        if self.closed:
            return
        if self.is_client:
            last = 0
        elif self.goaway_sent is not None:
            last = self.goaway_sent  # OPENs above the graceful GOAWAY's id were refused: keep it
        else:
            last = self._highest_id
        self._queue_control(_T_GOAWAY, 0, [last, int(code), message])
        self.goaway_sent = last
        self.closed = True
        self.streams.clear()

    # ------------------------------------------------------------- keepalive
    def tick(self, now: float) -> list[Event]:
        """Drive keepalive with the current time (seconds)."""
        if self.closed:
            return []
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at > self.local.keepalive_timeout_ms / 1000:
                return [self._fail(ProtocolError("keepalive timeout: no PONG", Status.UNAVAILABLE))]
            return []
        interval = self.local.keepalive_interval_ms
        if interval is not None and now - self.last_received >= interval / 1000:
            self.ping(now)
        return []

    def ping(self, now: float) -> bytes:
        self._ping_counter += 1
        data = self._ping_counter.to_bytes(8, "big")
        self._ping_sent_at = now
        self._out += _pack_header(8, _T_PING, 0, 0) + data
        return data


class _NotStringKeyed:
    """Stands for a decoded map with a key that is not a string (valid MessagePack, wrong shape)."""


_NOT_STRING_KEYED = _NotStringKeyed()


def _string_keyed(pairs: list[tuple[Any, Any]]) -> Any:
    """A map whose keys are all strings and whose values hold no such bad map, else the marker."""
    if all(isinstance(k, str) and v is not _NOT_STRING_KEYED for k, v in pairs):
        return dict(pairs)
    return _NOT_STRING_KEYED


def _list_of(items: list[Any]) -> Any:
    return _NOT_STRING_KEYED if any(v is _NOT_STRING_KEYED for v in items) else items


def _unpack_control(payload: bytes, what: str, any_keys: bool = False) -> Any:
    """Decode a control payload; invalid MessagePack is a connection error ``INTERNAL``.

    With ``any_keys`` a map with a non-string key (even an array or a map as a
    key), at any depth, makes the whole value decode as a
    :class:`_NotStringKeyed` marker, so that the caller can refuse it as a
    value of the wrong shape rather than as malformed bytes.
    """
    try:
        if any_keys:
            return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True,
                                   object_pairs_hook=_string_keyed, list_hook=_list_of)
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"malformed {what} payload: {type(exc).__name__}", Status.INTERNAL) from None


def _triple(payload: bytes, what: str, two: bool = False) -> tuple[int, str, Any]:
    body = _unpack_control(payload, what)
    n = 2 if two else 3
    if not isinstance(body, list) or len(body) != n:
        raise ProtocolError(f"{what} payload must be an array of {n}", Status.INTERNAL)
    first, message = body[0], body[1]
    if type(first) is not int or not isinstance(message, str):
        raise ProtocolError(f"{what} payload has wrong types", Status.INTERNAL)
    return first, message, (None if two else body[2])
