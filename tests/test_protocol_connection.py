"""The sans-IO Connection state machine (zrpc.protocol.connection).

Two Connection objects, one client and one server, are paired by handing one
end's ``data_to_send()`` to the other's ``receive_data()``. No sockets, no
sleeping: keepalive gets its clock passed in.
"""

from __future__ import annotations

import pathlib
import re
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zrpc.codec import encode
from zrpc.protocol import (
    Connection,
    ConnectionTerminated,
    Event,
    GoAwayReceived,
    HelloReceived,
    MessageReceived,
    PingAcked,
    Role,
    Settings,
    StatusReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowUpdated,
)
from zrpc.protocol.connection import MAX_WINDOW, PROTOCOL_VERSION, FlowControlBlocked
from zrpc.protocol.frames import (
    CONTROL_FRAME_LIMIT,
    HEADER_SIZE,
    FrameDecoder,
    FrameFlag,
    FrameType,
    encode_frame,
)
from zrpc.status import RpcError, Status, StreamClosed

HYPO = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

T = FrameType
F = FrameFlag


# ----------------------------------------------------------------- helpers


def hello_payload(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"version": PROTOCOL_VERSION, **Settings().announce()}
    body.update(overrides)
    return body


def frame(ftype: int, sid: int, body: Any = None, flags: int = 0, raw: bytes | None = None) -> bytes:
    """A raw frame; ``body`` is MessagePack-encoded unless ``raw`` is given."""
    payload = raw if raw is not None else (b"" if body is None else msgpack.packb(body))
    return encode_frame(ftype, flags, sid, payload)


def parse(data: bytes) -> list[tuple[FrameType, int, int, Any]]:
    """Decode bytes into (type, flags, stream id, decoded payload) tuples."""
    out = []
    for ftype, flags, sid, payload in FrameDecoder(2**32 - 1).feed(data):
        t = FrameType(ftype)
        body: Any
        if t in (T.HELLO, T.OPEN, T.STATUS, T.RESET, T.GOAWAY):
            body = msgpack.unpackb(payload, raw=False)
        elif t is T.WINDOW:
            (body,) = struct.unpack("!I", payload)
        else:
            body = payload
        out.append((t, flags, sid, body))
    return out


def sent(conn: Connection) -> list[tuple[FrameType, int, int, Any]]:
    return parse(conn.data_to_send())


def client_server(client: Settings | None = None, server: Settings | None = None,
                  extra: dict[str, Any] | None = None) -> tuple[Connection, Connection]:
    """A client and a server that completed the HELLO exchange at time 0."""
    c = Connection(Role.CLIENT, client)
    s = Connection(Role.SERVER, server)
    c.send_hello(extra)
    [ev] = s.receive_data(c.data_to_send(), 0.0)
    assert isinstance(ev, HelloReceived)
    s.send_hello()
    [ev] = c.receive_data(s.data_to_send(), 0.0)
    assert isinstance(ev, HelloReceived)
    return c, s


def c2s(c: Connection, s: Connection, now: float | None = None) -> list[Event]:
    return s.receive_data(c.data_to_send(), now)


def s2c(s: Connection, c: Connection, now: float | None = None) -> list[Event]:
    return c.receive_data(s.data_to_send(), now)


def server_after_hello(settings: Settings | None = None) -> Connection:
    """A server that accepted a (hand-written) client HELLO and queued its own."""
    s = Connection(Role.SERVER, settings)
    [ev] = s.receive_data(frame(T.HELLO, 0, hello_payload()))
    assert isinstance(ev, HelloReceived)
    s.send_hello()
    s.data_to_send()
    return s


def open_frame(sid: int, method: str = "Svc/M", timeout: int | None = None,
               metadata: dict[str, str] | None = None) -> bytes:
    return frame(T.OPEN, sid, [method, timeout, metadata or {}])


def terminated(events: list[Event]) -> ConnectionTerminated:
    assert events and isinstance(events[-1], ConnectionTerminated), events
    return events[-1]


def goaway_of(conn: Connection) -> list[Any]:
    frames = sent(conn)
    assert frames and frames[-1][0] is T.GOAWAY and frames[-1][2] == 0, frames
    return frames[-1][3]


# --------------------------------------------------------------- handshake


def test_hello_exchange() -> None:
    c = Connection(Role.CLIENT, Settings(max_message_size=1000, initial_stream_window=2048))
    s = Connection(Role.SERVER, Settings(max_concurrent_streams=7))
    assert not c.can_open_stream
    c.send_hello({"token": "tkn", "user_agent": "ua/1"})
    with pytest.raises(RuntimeError):
        c.send_hello()
    data = c.data_to_send()
    [(ftype, flags, sid, body)] = parse(data)
    assert (ftype, flags, sid) == (T.HELLO, 0, 0)
    assert body == {"version": 1, "max_message_size": 1000, "max_concurrent_streams": 1024,
                    "initial_stream_window": 2048, "initial_connection_window": 4 * 1024 * 1024,
                    "max_metadata_size": 16 * 1024, "token": "tkn", "user_agent": "ua/1"}
    assert s.receive_data(data) == [HelloReceived(body)]
    assert s.peer == body
    s.send_hello()
    data = s.data_to_send()
    [(ftype, _, _, sbody)] = parse(data)
    assert ftype is T.HELLO and sbody["max_concurrent_streams"] == 7 and "token" not in sbody
    assert c.receive_data(data) == [HelloReceived(sbody)]
    assert c.can_open_stream


def test_wrong_version_terminates_and_client_sees_goaway() -> None:
    c = Connection(Role.CLIENT)
    s = Connection(Role.SERVER)
    c.send_hello({"version": 2})
    ev = terminated(c2s(c, s))
    assert ev.code == Status.FAILED_PRECONDITION
    assert s.closed
    events = s2c(s, c)
    assert len(events) == 1 and isinstance(events[0], GoAwayReceived)
    assert events[0].code == Status.FAILED_PRECONDITION and events[0].last_stream_id == 0
    assert "version" in events[0].message
    with pytest.raises(RpcError) as info:
        c.open_stream("Svc/M")
    assert info.value.status is Status.UNAVAILABLE
    # a closed connection ignores further input
    assert s.receive_data(frame(T.HELLO, 0, hello_payload())) == []


def test_client_rejects_server_with_wrong_version() -> None:
    c = Connection(Role.CLIENT)
    c.send_hello()
    c.data_to_send()
    ev = terminated(c.receive_data(frame(T.HELLO, 0, hello_payload(version=0))))
    assert ev.code == Status.FAILED_PRECONDITION
    assert goaway_of(c)[1] == Status.FAILED_PRECONDITION


@pytest.mark.parametrize("body", [
    [1, 2],
    {"version": 1},
    hello_payload(initial_stream_window=0),
    hello_payload(initial_stream_window=2**31),
    hello_payload(initial_connection_window="big"),
    hello_payload(max_message_size=True),
    hello_payload(max_concurrent_streams=0),
], ids=range(7))
def test_bad_hello_settings(body: Any) -> None:
    s = Connection(Role.SERVER)
    ev = terminated(s.receive_data(frame(T.HELLO, 0, body)))
    assert ev.code == Status.INVALID_ARGUMENT
    assert goaway_of(s)[1] == Status.INVALID_ARGUMENT


def test_hello_malformed_or_on_stream_or_twice() -> None:
    s = Connection(Role.SERVER)
    assert terminated(s.receive_data(frame(T.HELLO, 0, raw=b"\xc1"))).code == Status.INTERNAL
    s = Connection(Role.SERVER)
    assert terminated(s.receive_data(frame(T.HELLO, 1, hello_payload()))).code == Status.INTERNAL
    s = server_after_hello()
    assert terminated(s.receive_data(frame(T.HELLO, 0, hello_payload()))).code == Status.INTERNAL


@pytest.mark.parametrize("data", [
    open_frame(1),
    frame(T.PING, 0, raw=b"12345678"),
    frame(T.END, 1),
    frame(T.MESSAGE, 1, raw=b"x"),
    frame(T.WINDOW, 0, raw=struct.pack("!I", 100)),
    frame(T.GOAWAY, 0, [0, 0, ""]),
    frame(T.RESET, 1, [1, ""]),
], ids=["open", "ping", "end", "message", "window", "goaway", "reset"])
def test_frames_before_hello_rejected_by_server(data: bytes) -> None:
    s = Connection(Role.SERVER)
    ev = terminated(s.receive_data(data))
    assert ev.code == Status.INTERNAL
    assert s.closed and s.peer is None
    assert goaway_of(s)[0] == 0


@pytest.mark.parametrize("data", [
    frame(T.PING, 0, raw=b"12345678"),
    frame(T.WINDOW, 0, raw=struct.pack("!I", 100)),
    frame(T.STATUS, 1, [0, "", None]),
], ids=["ping", "window", "status"])
def test_frames_before_hello_rejected_by_client(data: bytes) -> None:
    c = Connection(Role.CLIENT)
    c.send_hello()
    c.data_to_send()
    assert terminated(c.receive_data(data)).code == Status.INTERNAL


def test_client_accepts_goaway_instead_of_hello() -> None:
    c = Connection(Role.CLIENT)
    c.send_hello({"token": "bad"})
    c.data_to_send()
    events = c.receive_data(frame(T.GOAWAY, 0, [0, int(Status.UNAUTHENTICATED), "bad token"]))
    assert events == [GoAwayReceived(0, Status.UNAUTHENTICATED, "bad token")]
    assert not c.closed and not c.can_open_stream


def test_server_refuses_hello_by_closing() -> None:
    # what an authenticator does: close() with a status -> GOAWAY, then nothing more
    c = Connection(Role.CLIENT)
    s = Connection(Role.SERVER)
    c.send_hello({"token": "nope"})
    c2s(c, s)
    s.close(Status.UNAUTHENTICATED, "invalid token")
    assert s2c(s, c) == [GoAwayReceived(0, Status.UNAUTHENTICATED, "invalid token")]
    assert s.data_to_send() == b""
    s.close()  # idempotent
    assert s.data_to_send() == b""


# --------------------------------------------------------------- lifecycles


def test_unary_lifecycle() -> None:
    c, s = client_server()
    sid = c.open_stream("Svc/Unary", {"k": "v"}, timeout_ms=1500)
    assert sid == 1
    c.send_message(sid, b"req", end_stream=True)
    assert c.streams[sid].state is StreamState.HALF_CLOSED_LOCAL
    assert c2s(c, s) == [
        StreamOpened(1, "Svc/Unary", 1500, {"k": "v"}),
        MessageReceived(1, b"req", False, True),
        StreamEnded(1),
    ]
    assert s.streams[1].state is StreamState.HALF_CLOSED_REMOTE
    s.send_message(1, b"resp")
    s.send_status(1, Status.OK, "", {"d": 1})
    assert 1 not in s.streams
    assert s2c(s, c) == [MessageReceived(1, b"resp", False, False), StatusReceived(1, 0, "", {"d": 1})]
    assert c.streams == {} and s.streams == {}
    with pytest.raises(StreamClosed):
        c.send_message(1, b"late")
    with pytest.raises(StreamClosed):
        s.send_status(1, Status.OK)


def test_client_streaming_lifecycle() -> None:
    c, s = client_server()
    sid = c.open_stream("Svc/Collect")
    for i in range(3):
        c.send_message(sid, b"m%d" % i)
    c.end_stream(sid)
    with pytest.raises(StreamClosed):
        c.send_message(sid, b"after end")
    with pytest.raises(StreamClosed):
        c.end_stream(sid)
    events = c2s(c, s)
    assert events == [StreamOpened(sid, "Svc/Collect", None, {})] + [
        MessageReceived(sid, b"m%d" % i, False, False) for i in range(3)] + [StreamEnded(sid)]
    s.send_message(sid, b"summary", compressed=True)
    s.send_status(sid, Status.OK)
    assert s2c(s, c) == [MessageReceived(sid, b"summary", True, False), StatusReceived(sid, 0, "", None)]
    assert c.streams == {} and s.streams == {}


def test_server_streaming_lifecycle() -> None:
    c, s = client_server()
    sid = c.open_stream("Svc/Repeat")
    c.send_message(sid, b"n=3", end_stream=True)
    c2s(c, s)
    for i in range(3):
        s.send_message(sid, b"r%d" % i)
    s.send_status(sid, Status.NOT_FOUND, "gone", None)
    events = s2c(s, c)
    assert events[:3] == [MessageReceived(sid, b"r%d" % i, False, False) for i in range(3)]
    assert events[3] == StatusReceived(sid, Status.NOT_FOUND, "gone", None)


def test_bidi_lifecycle_interleaved() -> None:
    c, s = client_server()
    sid = c.open_stream("Svc/Chat")
    c.send_message(sid, b"a")
    assert [type(e) for e in c2s(c, s)] == [StreamOpened, MessageReceived]
    s.send_message(sid, b"A")
    assert s2c(s, c) == [MessageReceived(sid, b"A", False, False)]
    c.send_message(sid, b"b")
    s.send_message(sid, b"B")
    assert c2s(c, s) == [MessageReceived(sid, b"b", False, False)]
    assert s2c(s, c) == [MessageReceived(sid, b"B", False, False)]
    c.end_stream(sid)
    assert c2s(c, s) == [StreamEnded(sid)]
    s.send_message(sid, b"C")  # the server may still send after the client's half-close
    s.send_status(sid, Status.OK)
    assert s2c(s, c) == [MessageReceived(sid, b"C", False, False), StatusReceived(sid, 0, "", None)]


def test_stream_ids_odd_and_increasing() -> None:
    c, s = client_server()
    ids = [c.open_stream("Svc/M") for _ in range(4)]
    assert ids == [1, 3, 5, 7]
    assert [type(e) for e in c2s(c, s)] == [StreamOpened] * 4


def test_stream_ids_exhausted_fails_locally() -> None:
    c, s = client_server()
    c._next_id = 2**31 - 1  # as if 2^30 - 1 streams had been opened
    s._highest_id = 2**31 - 3
    assert c.open_stream("Svc/M") == 2**31 - 1
    assert [type(e) for e in c2s(c, s)] == [StreamOpened]
    with pytest.raises(RpcError) as info:
        c.open_stream("Svc/M")
    assert info.value.status is Status.UNAVAILABLE
    assert c.data_to_send() == b"" and not s.closed


def test_local_misuse_raises() -> None:
    c, s = client_server()
    with pytest.raises(RuntimeError):
        s.open_stream("Svc/M")
    sid = c.open_stream("Svc/M")
    c2s(c, s)
    with pytest.raises(StreamClosed):
        c.send_status(sid, Status.OK)
    with pytest.raises(StreamClosed):
        s.end_stream(sid)
    with pytest.raises(RuntimeError):
        s.send_message(sid, b"x", end_stream=True)
    with pytest.raises(StreamClosed):
        c.send_credit(99)
    with pytest.raises(RpcError) as info:
        c.send_message(sid, b"x" * (4 * 1024 * 1024 + 1))
    assert info.value.status is Status.RESOURCE_EXHAUSTED
    with pytest.raises(RpcError) as info:
        c.open_stream("Svc/M", {"k": "v" * CONTROL_FRAME_LIMIT})
    assert info.value.status is Status.INVALID_ARGUMENT
    assert c.open_stream("Svc/M") == 3  # the refused id was not consumed
    with pytest.raises(RuntimeError):
        Connection(Role.CLIENT).open_stream("Svc/M")


def test_open_stream_refused_locally_at_peer_limit() -> None:
    c, _s = client_server(server=Settings(max_concurrent_streams=2))
    c.open_stream("Svc/M")
    c.open_stream("Svc/M")
    assert not c.can_open_stream
    with pytest.raises(RpcError) as info:
        c.open_stream("Svc/M")
    assert info.value.status is Status.RESOURCE_EXHAUSTED


# -------------------------------------------------------------------- RESET


def test_client_reset_reaches_server() -> None:
    c, s = client_server()
    sid = c.open_stream("Svc/M")
    c2s(c, s)
    c.reset_stream(sid, Status.CANCELLED, "bye")
    assert sid not in c.streams
    c.reset_stream(sid, Status.CANCELLED)  # no-op on a closed stream
    assert c2s(c, s) == [StreamReset(sid, Status.CANCELLED, "bye")]
    assert s.streams == {}
    with pytest.raises(StreamClosed):
        s.send_message(sid, b"x")


def test_server_reset_reaches_client() -> None:
    c, s = client_server()
    sid = c.open_stream("Svc/M")
    c.send_message(sid, b"x", end_stream=True)
    c2s(c, s)
    s.reset_stream(sid, Status.INTERNAL, "boom")
    assert s2c(s, c) == [StreamReset(sid, Status.INTERNAL, "boom")]
    assert c.streams == {}


def test_malformed_reset_or_status_is_connection_error() -> None:
    c, s = client_server()
    sid = c.open_stream("Svc/M")
    c2s(c, s)
    assert terminated(s.receive_data(frame(T.RESET, sid, [1]))).code == Status.INTERNAL
    c, s = client_server()
    sid = c.open_stream("Svc/M")
    c2s(c, s)
    assert terminated(c.receive_data(frame(T.STATUS, sid, [0, 5, None]))).code == Status.INTERNAL


# ------------------------------------------------------- stream id violations


@pytest.mark.parametrize("sids", [[2], [0], [1, 1], [3, 1], [5, 3]], ids=repr)
def test_even_reused_or_decreasing_ids_are_connection_errors(sids: list[int]) -> None:
    s = server_after_hello()
    *ok, bad = sids
    for sid in ok:
        assert [type(e) for e in s.receive_data(open_frame(sid))] == [StreamOpened]
    ev = terminated(s.receive_data(open_frame(bad)))
    assert ev.code == Status.INTERNAL
    last, code, _msg = goaway_of(s)
    assert code == Status.INTERNAL and last == max(ok, default=0)


@pytest.mark.parametrize("data", [
    frame(T.MESSAGE, 9, raw=b"x"),
    frame(T.END, 9),
    frame(T.RESET, 9, [1, ""]),
    frame(T.WINDOW, 9, raw=struct.pack("!I", 1)),
    frame(T.MESSAGE, 0, raw=b"x"),
], ids=["message", "end", "reset", "window", "message-on-0"])
def test_frames_on_never_opened_stream(data: bytes) -> None:
    s = server_after_hello()
    s.receive_data(open_frame(1))
    assert terminated(s.receive_data(data)).code == Status.INTERNAL


def test_server_only_and_client_only_frames() -> None:
    c, s = client_server()
    sid = c.open_stream("Svc/M")
    c2s(c, s)
    # a client must not send STATUS, a server must not send OPEN or END
    assert terminated(s.receive_data(frame(T.STATUS, sid, [0, "", None]))).code == Status.INTERNAL
    c, s = client_server()
    assert terminated(c.receive_data(open_frame(2))).code == Status.INTERNAL
    c, s = client_server()
    sid = c.open_stream("Svc/M")
    c2s(c, s)
    assert terminated(c.receive_data(frame(T.END, sid))).code == Status.INTERNAL
    c, s = client_server()
    sid = c.open_stream("Svc/M")
    c2s(c, s)
    events = c.receive_data(frame(T.MESSAGE, sid, raw=b"x", flags=F.END_STREAM))
    assert terminated(events).code == Status.INTERNAL


def test_message_after_end_resets_stream() -> None:
    s = server_after_hello()
    s.receive_data(open_frame(1) + frame(T.END, 1))
    events = s.receive_data(frame(T.MESSAGE, 1, raw=b"late"))
    assert len(events) == 1 and isinstance(events[0], StreamReset) and events[0].code == Status.INTERNAL
    [(t, _, sid, body)] = sent(s)
    assert (t, sid, body[0]) == (T.RESET, 1, Status.INTERNAL)
    assert s.streams == {} and not s.closed
    # the bytes were returned to the connection window: nothing owed
    assert s._recv_conn_window + s._conn_unacked == Settings().initial_connection_window


def test_second_end_resets_stream() -> None:
    s = server_after_hello()
    s.receive_data(open_frame(1) + frame(T.END, 1))
    events = s.receive_data(frame(T.END, 1))
    assert [type(e) for e in events] == [StreamReset]
    assert sent(s)[0][0] is T.RESET


# ------------------------------------------------------------ late frames


def test_late_frames_on_closed_streams_ignored() -> None:
    c, s = client_server()
    sid = c.open_stream("Svc/M")
    c.send_message(sid, b"x")
    c2s(c, s)
    # server finishes while the client keeps talking; the client cancels concurrently
    s.send_message(sid, b"y")
    s.send_status(sid, Status.OK)
    c.send_message(sid, b"z" * 10)
    c.reset_stream(sid, Status.CANCELLED)
    assert c2s(c, s) == []  # MESSAGE and RESET for a finished stream: ignored
    assert s2c(s, c) == []  # MESSAGE and STATUS for a reset stream: ignored
    assert not c.closed and not s.closed
    # late WINDOW and END too
    assert s.receive_data(frame(T.END, sid) + frame(T.WINDOW, sid, raw=struct.pack("!I", 5))) == []
    assert c.receive_data(frame(T.WINDOW, sid, raw=struct.pack("!I", 5))) == []
    # late messages still count against (and are returned to) the connection window
    assert s._conn_unacked == 10


# ------------------------------------------------------------ limits / OPEN


def test_max_concurrent_streams_reset_resource_exhausted() -> None:
    s = server_after_hello(Settings(max_concurrent_streams=2))
    assert len(s.receive_data(open_frame(1) + open_frame(3))) == 2
    assert s.receive_data(open_frame(5)) == []
    [(t, _, sid, body)] = sent(s)
    assert (t, sid, body[0]) == (T.RESET, 5, Status.RESOURCE_EXHAUSTED)
    assert set(s.streams) == {1, 3}
    # frames for the refused stream are late frames, not errors
    assert s.receive_data(frame(T.MESSAGE, 5, raw=b"x") + frame(T.END, 5)) == []
    # a slot frees up when a stream finishes
    s.send_status(1, Status.OK)
    assert [type(e) for e in s.receive_data(open_frame(7))] == [StreamOpened]


def test_max_concurrent_streams_seen_by_client() -> None:
    # the client believes the server allows more (stale settings): the server refuses
    c = Connection(Role.CLIENT, peer_settings=hello_payload(max_concurrent_streams=10))
    s = Connection(Role.SERVER, Settings(max_concurrent_streams=1))
    c.send_hello()
    c2s(c, s)
    s.send_hello()
    a = c.open_stream("Svc/M")
    b = c.open_stream("Svc/M")
    assert [type(e) for e in c2s(c, s)] == [StreamOpened]
    events = s2c(s, c)
    assert [type(e) for e in events] == [HelloReceived, StreamReset]
    assert events[1] == StreamReset(b, Status.RESOURCE_EXHAUSTED, events[1].message)  # type: ignore[attr-defined]
    assert set(c.streams) == {a}


@pytest.mark.parametrize("body", [
    ["", None, {}],
    [7, None, {}],
    ["Svc/M", -1, {}],
    ["Svc/M", 1.5, {}],
    ["Svc/M", True, {}],
    ["Svc/M", 2**40, {}],
    ["Svc/M", None, {"k": 1}],
    ["Svc/M", None, []],
    ["Svc/M", None],
    ["Svc/M", None, {}, "extra"],
    {"method": "Svc/M", "timeout": None, "metadata": {}},
    "abc",
    5,
], ids=range(13))
def test_malformed_open_resets_invalid_argument(body: Any) -> None:
    s = server_after_hello()
    assert s.receive_data(frame(T.OPEN, 1, body)) == []
    [(t, _, sid, reset)] = sent(s)
    assert (t, sid, reset[0]) == (T.RESET, 1, Status.INVALID_ARGUMENT)
    assert not s.closed and s.streams == {}
    assert [type(e) for e in s.receive_data(open_frame(3))] == [StreamOpened]


def test_open_not_msgpack_resets_invalid_argument() -> None:
    s = server_after_hello()
    assert s.receive_data(frame(T.OPEN, 1, raw=b"\x93\xc1\xc0\x80")) == []
    assert sent(s)[0][3][0] == Status.INVALID_ARGUMENT


def test_open_above_max_metadata_size() -> None:
    s = server_after_hello(Settings(max_metadata_size=100))
    assert s.receive_data(open_frame(1, metadata={"k": "v" * 100})) == []
    [(t, _, sid, body)] = sent(s)
    assert (t, sid, body[0]) == (T.RESET, 1, Status.RESOURCE_EXHAUSTED)


def test_open_timeout_and_metadata_delivered() -> None:
    s = server_after_hello()
    events = s.receive_data(open_frame(1, "A/B", 0, {"x-id": "7"}))
    assert events == [StreamOpened(1, "A/B", 0, {"x-id": "7"})]


def test_message_above_max_message_size_is_connection_error() -> None:
    s = server_after_hello(Settings(max_message_size=10))
    s.receive_data(open_frame(1))
    ev = terminated(s.receive_data(frame(T.MESSAGE, 1, raw=b"x" * 11)[:HEADER_SIZE]))
    assert ev.code == Status.RESOURCE_EXHAUSTED


def test_decoder_buffer_released_after_connection_error() -> None:
    s = server_after_hello()
    s.receive_data(b"\x00\x00\x00")  # a partial header is buffered
    big = b"\x00" * 200_000  # completes a header with type 0 (unknown)
    terminated(s.receive_data(big))
    assert s._decoder.buffered <= HEADER_SIZE + Settings().max_message_size
    assert s._decoder.buffered < len(big)


# ---------------------------------------------------------- flow control


def test_sender_blocked_until_receiver_acknowledges() -> None:
    c, s = client_server(server=Settings(initial_stream_window=1000))
    sid = c.open_stream("Svc/M")
    assert c.send_credit(sid) == 1000
    c.send_message(sid, b"x" * 600)
    assert c.send_credit(sid) == 400
    c.send_message(sid, b"x" * 600)  # credit > 0: may overshoot by one message
    assert c.send_credit(sid) == -200
    with pytest.raises(FlowControlBlocked):
        c.send_message(sid, b"")
    events = c2s(c, s)
    assert [type(e) for e in events] == [StreamOpened, MessageReceived, MessageReceived]
    assert s.data_to_send() == b""  # nothing returned until the application consumes
    s.acknowledge(sid, 100)  # below a quarter of the window: no WINDOW yet
    assert s.data_to_send() == b""
    s.acknowledge(sid, 500)
    frames = sent(s)
    assert frames == [(T.WINDOW, 0, sid, 600)]
    assert c.receive_data(encode_frame(*frames[0][:3], struct.pack("!I", 600))) == [WindowUpdated(sid)]
    assert c.send_credit(sid) == 400
    c.send_message(sid, b"ok")


def test_connection_window_blocks_all_streams() -> None:
    c, s = client_server(server=Settings(initial_connection_window=1000))
    a = c.open_stream("Svc/M")
    b = c.open_stream("Svc/M")
    c.send_message(a, b"x" * 1000)
    assert c.send_credit(b) == 0
    with pytest.raises(FlowControlBlocked):
        c.send_message(b, b"y")
    c2s(c, s)
    s.acknowledge(a, 1000)
    frames = sent(s)
    assert (T.WINDOW, 0, 0, 1000) in frames
    c.receive_data(encode_frame(T.WINDOW, 0, 0, struct.pack("!I", 1000)))
    assert c.send_credit(b) == 1000


def test_window_updates_stop_after_peer_half_close() -> None:
    # the server does not return stream credit once the client can no longer send
    c, s = client_server(server=Settings(initial_stream_window=1000, initial_connection_window=10**6))
    sid = c.open_stream("Svc/M")
    c.send_message(sid, b"x" * 500, end_stream=True)
    c2s(c, s)
    s.acknowledge(sid, 500)
    assert s.data_to_send() == b""


def test_acknowledge_zero_bytes_never_sends_empty_window() -> None:
    c, s = client_server(server=Settings(initial_stream_window=2, initial_connection_window=3))
    sid = c.open_stream("Svc/M")
    c.send_message(sid, b"")
    c2s(c, s)
    s.acknowledge(sid, 0)
    assert s2c(s, c) == []
    assert not c.closed
    c.send_message(sid, b"ab")
    c2s(c, s)
    s.acknowledge(sid, 2)
    assert sent(s) == [(T.WINDOW, 0, 0, 2), (T.WINDOW, 0, sid, 2)]


@pytest.mark.parametrize("window", ["stream", "connection"])
def test_receiver_detects_overrun(window: str) -> None:
    small = Settings(initial_stream_window=100) if window == "stream" else Settings(initial_connection_window=100)
    s = server_after_hello(small)
    s.receive_data(open_frame(1))
    # 150 bytes are fine: the window was positive when the message was sent
    assert [type(e) for e in s.receive_data(frame(T.MESSAGE, 1, raw=b"x" * 150))] == [MessageReceived]
    ev = terminated(s.receive_data(frame(T.MESSAGE, 1, raw=b"x")))
    assert ev.code == Status.RESOURCE_EXHAUSTED
    assert goaway_of(s)[1] == Status.RESOURCE_EXHAUSTED


def test_overrun_of_exactly_the_window() -> None:
    s = server_after_hello(Settings(initial_stream_window=100))
    s.receive_data(open_frame(1))
    assert len(s.receive_data(frame(T.MESSAGE, 1, raw=b"x" * 100))) == 1
    assert terminated(s.receive_data(frame(T.MESSAGE, 1, raw=b""))).code == Status.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("sid", [0, 1])
def test_window_overflow(sid: int) -> None:
    c, s = client_server()
    c.open_stream("Svc/M")
    c2s(c, s)
    inc = MAX_WINDOW - (Settings().initial_connection_window if sid == 0 else Settings().initial_stream_window)
    assert c.receive_data(encode_frame(T.WINDOW, 0, sid, struct.pack("!I", inc))) == [WindowUpdated(sid)]
    ev = terminated(c.receive_data(encode_frame(T.WINDOW, 0, sid, struct.pack("!I", 1))))
    assert ev.code == Status.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x00", b"\x00\x00\x00\x00", b"\x00\x00\x00\x01\x00"])
def test_malformed_window(payload: bytes) -> None:
    c, _s = client_server()
    assert terminated(c.receive_data(encode_frame(T.WINDOW, 0, 0, payload))).code == Status.INTERNAL


# ------------------------------------------------------------------ GOAWAY


def test_goaway_refuses_new_streams_and_lets_old_ones_finish() -> None:
    c, s = client_server()
    first = c.open_stream("Svc/M")
    c2s(c, s)
    late = c.open_stream("Svc/M")  # in flight while the server decides to go away
    s.goaway(Status.OK, "draining")
    assert s.goaway_sent == first
    assert s2c(s, c) == [GoAwayReceived(first, Status.OK, "draining")]
    assert not c.can_open_stream
    with pytest.raises(RpcError) as info:
        c.open_stream("Svc/M")
    assert info.value.status is Status.UNAVAILABLE
    assert c2s(c, s) == []  # the late OPEN is refused, no StreamOpened
    events = s2c(s, c)
    assert len(events) == 1 and isinstance(events[0], StreamReset)
    assert (events[0].stream_id, events[0].code) == (late, Status.UNAVAILABLE)
    # the earlier stream completes normally
    c.send_message(first, b"req", end_stream=True)
    assert [type(e) for e in c2s(c, s)] == [MessageReceived, StreamEnded]
    s.send_message(first, b"resp")
    s.send_status(first, Status.OK)
    assert [type(e) for e in s2c(s, c)] == [MessageReceived, StatusReceived]
    s.goaway()  # only once
    assert s.data_to_send() == b""


def test_malformed_goaway() -> None:
    c, _s = client_server()
    assert terminated(c.receive_data(frame(T.GOAWAY, 0, [0, 0]))).code == Status.INTERNAL
    c, _s = client_server()
    assert terminated(c.receive_data(frame(T.GOAWAY, 0, [-1, 0, ""]))).code == Status.INTERNAL


def test_close_clears_streams_and_ignores_input() -> None:
    c, s = client_server()
    sid = c.open_stream("Svc/M")
    c2s(c, s)
    s.close(Status.UNAVAILABLE, "bye")
    assert s.closed and s.streams == {}
    assert s2c(s, c) == [GoAwayReceived(sid, Status.UNAVAILABLE, "bye")]
    assert s.receive_data(frame(T.MESSAGE, sid, raw=b"x")) == []
    assert s.tick(10**6) == []


# --------------------------------------------------------------- keepalive


def test_ping_gets_pong() -> None:
    c, s = client_server()
    data = s.ping(0.0)
    assert len(data) == 8
    assert c2s(c, s) == []
    assert s2c(s, c) == []
    frames = sent(c)
    assert frames == [(T.PONG, 0, 0, data)]
    assert s.receive_data(encode_frame(T.PONG, 0, 0, data)) == [PingAcked(data)]


@pytest.mark.parametrize("data", [encode_frame(T.PING, 0, 1, b"12345678"), encode_frame(T.PING, 0, 0, b"1234"),
                                  encode_frame(T.PONG, 0, 0, b"123456789")], ids=["ping-on-stream", "short-ping",
                                                                                  "long-pong"])
def test_malformed_ping(data: bytes) -> None:
    c, _s = client_server()
    assert terminated(c.receive_data(data)).code == Status.INTERNAL


def test_keepalive_ping_and_timeout() -> None:
    ka = Settings(keepalive_interval_ms=1000, keepalive_timeout_ms=500)
    c, s = client_server(client=ka)
    assert c.tick(0.5) == [] and c.data_to_send() == b""
    assert c.tick(1.0) == []
    [(t, _, sid, data)] = sent(c)
    assert (t, sid) == (T.PING, 0)
    s.receive_data(encode_frame(T.PING, 0, 0, data))
    assert c.receive_data(s.data_to_send(), 1.2) == [PingAcked(data)]
    assert c.tick(2.1) == [] and c.data_to_send() == b""  # 0.9 s of silence only
    c.receive_data(b"", 2.0)  # any received bytes count as activity
    assert c.tick(2.9) == [] and c.data_to_send() == b""
    assert c.tick(3.0) == []
    assert sent(c)[0][0] is T.PING
    assert c.tick(3.5) == []  # exactly the timeout: still waiting
    ev = terminated(c.tick(3.51))
    assert ev.code == Status.UNAVAILABLE
    assert goaway_of(c)[1] == Status.UNAVAILABLE
    assert c.closed


def test_keepalive_disabled_by_default() -> None:
    c, _s = client_server()
    assert c.tick(10**9) == [] and c.data_to_send() == b""


# -------------------------------------------------------- robustness fuzz


@HYPO
@given(chunks=st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_bytes_after_hello_never_raise(chunks: list[bytes]) -> None:
    s = server_after_hello(Settings(max_message_size=4096))
    bound = HEADER_SIZE + max(4096, CONTROL_FRAME_LIMIT)
    for chunk in chunks:
        was_closed = s.closed
        events = s.receive_data(chunk)
        assert all(isinstance(e, Event) for e in events)
        assert not any(isinstance(e, ConnectionTerminated) for e in events[:-1])
        assert s._decoder.buffered <= bound
        if was_closed:
            assert events == []
        elif s.closed:
            assert isinstance(events[-1], ConnectionTerminated)


def _valid_client_bytes() -> bytes:
    return b"".join([
        open_frame(1, "A/B", 100, {"k": "v"}),
        frame(T.MESSAGE, 1, raw=b"hello", flags=F.COMPRESSED),
        frame(T.WINDOW, 0, raw=struct.pack("!I", 10)),
        frame(T.PING, 0, raw=b"\x00" * 8),
        frame(T.END, 1),
        open_frame(3),
        frame(T.RESET, 3, [int(Status.CANCELLED), "x"]),
        frame(T.GOAWAY, 0, [0, 0, ""]),
    ])


@HYPO
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, 10_000), split=st.integers(1, 64))
def test_mutated_valid_stream_never_raises(edits: list[tuple[int, int]], cut: int, split: int) -> None:
    data = bytearray(_valid_client_bytes())
    for pos, value in edits:
        data[pos % len(data)] = value
    data = data[: cut % (len(data) + 1)]
    s = server_after_hello()
    for i in range(0, len(data), split):
        events = s.receive_data(bytes(data[i:i + split]))
        assert all(isinstance(e, Event) for e in events)
        assert s._decoder.buffered <= HEADER_SIZE + Settings().max_message_size
    assert s.closed or s._decoder.buffered <= len(data)
    s.data_to_send()  # whatever was queued is well-formed
    parse(s.data_to_send())


# ---------------------------------------------------- random operations model

METHODS = ["Svc/A", "Svc/B"]


class PairMachine(RuleBasedStateMachine):
    """Random client/server operations; bytes are delivered in random-sized pieces.

    Local operations may raise only documented local errors; the peers never
    see a protocol violation; after full delivery both agree on every stream.
    """

    def __init__(self) -> None:
        super().__init__()
        self.c, self.s = client_server(
            client=Settings(initial_stream_window=150, initial_connection_window=450, max_message_size=200),
            server=Settings(initial_stream_window=120, initial_connection_window=400, max_message_size=200,
                            max_concurrent_streams=3),
        )
        self.to_s = b""  # bytes in flight client -> server
        self.to_c = b""
        self.unacked_s: dict[int, int] = {}  # bytes received by the server, not yet consumed
        self.unacked_c: dict[int, int] = {}
        self.opened: list[int] = []

    # ---- delivery
    def _collect(self) -> None:
        self.to_s += self.c.data_to_send()
        self.to_c += self.s.data_to_send()

    def _handle(self, events: list[Event], unacked: dict[int, int]) -> None:
        for ev in events:
            assert not isinstance(ev, ConnectionTerminated), ev
            if isinstance(ev, MessageReceived):
                unacked[ev.stream_id] = unacked.get(ev.stream_id, 0) + len(ev.payload)

    def _deliver_s(self, n: int) -> None:
        self._collect()
        chunk, self.to_s = self.to_s[:n], self.to_s[n:]
        self._handle(self.s.receive_data(chunk), self.unacked_s)

    def _deliver_c(self, n: int) -> None:
        self._collect()
        chunk, self.to_c = self.to_c[:n], self.to_c[n:]
        self._handle(self.c.receive_data(chunk), self.unacked_c)

    @rule(n=st.integers(1, 400))
    def deliver_to_server(self, n: int) -> None:
        self._deliver_s(n)

    @rule(n=st.integers(1, 400))
    def deliver_to_client(self, n: int) -> None:
        self._deliver_c(n)

    def flush(self) -> None:
        for _ in range(50):
            self._collect()
            if not self.to_s and not self.to_c:
                return
            self._deliver_s(len(self.to_s))
            self._deliver_c(len(self.to_c))
        raise AssertionError("delivery does not settle")

    @rule()
    def flush_and_check(self) -> None:
        self.flush()
        self.check_agreement()

    def check_agreement(self) -> None:
        """With nothing in flight both ends agree on every stream and every window."""
        c, s = self.c, self.s
        assert not c.closed and not s.closed
        assert set(c.streams) == set(s.streams)
        expect = {StreamState.OPEN: StreamState.OPEN,
                  StreamState.HALF_CLOSED_LOCAL: StreamState.HALF_CLOSED_REMOTE}
        for sid, cst in c.streams.items():
            sst = s.streams[sid]
            assert expect[cst.state] is sst.state
            assert cst.send_window == sst.recv_window
            assert sst.send_window == cst.recv_window
        assert c._send_conn_window == s._recv_conn_window
        assert s._send_conn_window == c._recv_conn_window
        if s.goaway_sent is not None:
            assert all(sid <= s.goaway_sent for sid in s.streams)

    def teardown(self) -> None:
        self.flush()
        self.check_agreement()
        # liveness: once the applications consume everything, every sender has credit again
        for sid in list(self.unacked_s):
            self.s.acknowledge(sid, self.unacked_s.pop(sid))
        for sid in list(self.unacked_c):
            self.c.acknowledge(sid, self.unacked_c.pop(sid))
        self.flush()
        self.check_agreement()
        assert self.c._send_conn_window > 0 and self.s._send_conn_window > 0
        for sid, cst in self.c.streams.items():
            assert self.s.send_credit(sid) > 0
            if cst.state is StreamState.OPEN:
                assert self.c.send_credit(sid) > 0

    # ---- operations
    def _pick(self, conn: Connection, i: int) -> int:
        """Mostly a stream ``conn`` has open; sometimes any id ever opened (maybe closed)."""
        live = sorted(conn.streams)
        ids = (self.opened if i % 4 == 0 or not live else live) or [1]
        return ids[(i // 4) % len(ids)]

    @rule(method=st.sampled_from(METHODS), timeout=st.none() | st.integers(0, 10**6))
    def open(self, method: str, timeout: int | None) -> None:
        try:
            self.opened.append(self.c.open_stream(method, {"m": "1"}, timeout))
        except RpcError:
            pass

    @precondition(lambda self: bool(self.c.streams))
    @rule(i=st.integers(0, 50), size=st.integers(0, 200), end=st.integers(0, 3), z=st.booleans())
    def client_send(self, i: int, size: int, end: int, z: bool) -> None:
        try:
            self.c.send_message(self._pick(self.c, i), b"c" * size, end_stream=end == 0, compressed=z)
        except (StreamClosed, FlowControlBlocked):
            pass

    @precondition(lambda self: bool(self.s.streams))
    @rule(i=st.integers(0, 50), size=st.integers(0, 200))
    def server_send(self, i: int, size: int) -> None:
        try:
            self.s.send_message(self._pick(self.s, i), b"s" * size)
        except (StreamClosed, FlowControlBlocked):
            pass

    @precondition(lambda self: bool(self.c.streams))
    @rule(i=st.integers(0, 50))
    def client_end(self, i: int) -> None:
        try:
            self.c.end_stream(self._pick(self.c, i))
        except StreamClosed:
            pass

    @precondition(lambda self: bool(self.s.streams))
    @rule(i=st.integers(0, 50), code=st.sampled_from(list(Status)))
    def server_status(self, i: int, code: Status) -> None:
        try:
            self.s.send_status(self._pick(self.s, i), code, "done", {"n": i})
        except StreamClosed:
            pass

    @precondition(lambda self: bool(self.opened))
    @rule(i=st.integers(0, 50), server=st.booleans())
    def reset(self, i: int, server: bool) -> None:
        (self.s if server else self.c).reset_stream(self._pick(self.c, i), Status.CANCELLED, "r")

    @rule(server=st.booleans(), i=st.integers(0, 50), part=st.integers(1, 4))
    def acknowledge(self, server: bool, i: int, part: int) -> None:
        unacked = self.unacked_s if server else self.unacked_c
        if not unacked:
            return
        sid = sorted(unacked)[i % len(unacked)]
        n = unacked[sid] if part == 4 else unacked[sid] // part
        unacked[sid] -= n
        if not unacked[sid]:
            del unacked[sid]
        (self.s if server else self.c).acknowledge(sid, n)

    @precondition(lambda self: self.s.goaway_sent is None)
    @rule()
    def goaway(self) -> None:
        self.s.goaway(Status.OK, "drain")

    @rule()
    def ping(self) -> None:
        self.c.ping(0.0)

    @invariant()
    def windows_within_limits(self) -> None:
        for conn in (self.c, self.s):
            assert conn._send_conn_window <= MAX_WINDOW
            for st_ in conn.streams.values():
                assert st_.send_window <= MAX_WINDOW


TestPairMachine = PairMachine.TestCase
TestPairMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------- docs/protocol.md example


def unary_example() -> list[tuple[str, str, bytes]]:
    """The worked example of docs/protocol.md, produced by the real code."""
    c = Connection(Role.CLIENT)
    s = Connection(Role.SERVER)
    out: list[tuple[str, str, bytes]] = []
    c.send_hello({"user_agent": "zrpc-python"})
    out.append(("C->S", "HELLO", c.data_to_send()))
    s.receive_data(out[-1][2])
    s.send_hello()
    out.append(("S->C", "HELLO", s.data_to_send()))
    c.receive_data(out[-1][2])
    sid = c.open_stream("Health/Check", None, 5000)
    out.append(("C->S", "OPEN", c.data_to_send()))
    c.send_message(sid, encode({}), end_stream=True)
    out.append(("C->S", "MESSAGE", c.data_to_send()))
    events = s.receive_data(out[-2][2] + out[-1][2])
    assert [type(e) for e in events] == [StreamOpened, MessageReceived, StreamEnded]
    s.send_message(sid, encode({"status": "SERVING"}))
    out.append(("S->C", "MESSAGE", s.data_to_send()))
    s.send_status(sid, Status.OK)
    out.append(("S->C", "STATUS", s.data_to_send()))
    events = c.receive_data(out[-2][2] + out[-1][2])
    assert events == [MessageReceived(1, encode({"status": "SERVING"}), False, False),
                      StatusReceived(1, 0, "", None)]
    return out


def doc_example() -> list[tuple[str, str, bytes]]:
    text = DOC.read_text()
    m = re.search(r"```zrpc-hex\n(.*?)```", text, re.S)
    assert m, "docs/protocol.md has no ```zrpc-hex block"
    frames: list[tuple[str, str, bytes]] = []
    for line in m.group(1).splitlines():
        head = re.match(r"#\s*(C->S|S->C)\s+(\w+)", line)
        if head:
            frames.append((head.group(1), head.group(2), b""))
        elif line.strip() and not line.lstrip().startswith("#"):
            hexpart = line.split("|")[0]
            d, name, data = frames[-1]
            frames[-1] = (d, name, data + bytes.fromhex(hexpart))
    return frames


def test_doc_example_matches_code() -> None:
    assert doc_example() == unary_example()


def test_doc_tables_match_code() -> None:
    text = DOC.read_text()
    for t in FrameType:
        assert re.search(rf"\|\s*`?0x{int(t):X}`?\s*\|\s*{t.name}\s*\|", text), t
    for code in Status:
        assert re.search(rf"\|\s*{int(code)}\s*\|\s*{code.name}\s*\|", text), code
