"""The frame codec (zrpc.protocol.frames): layout, incremental decoding, limits."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zrpc.protocol.frames import (
    CONTROL_FRAME_LIMIT,
    HEADER_SIZE,
    MAX_STREAM_ID,
    FrameDecoder,
    FrameFlag,
    FrameType,
    encode_frame,
)
from zrpc.status import ProtocolError, Status

HYPO = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def header(length: int, ftype: int, flags: int, sid: int) -> bytes:
    return struct.pack("!IBBI", length, ftype, flags, sid)


# ------------------------------------------------------------------ layout


def test_header_layout_is_10_bytes_big_endian() -> None:
    assert HEADER_SIZE == 10
    data = encode_frame(FrameType.MESSAGE, FrameFlag.END_STREAM | FrameFlag.COMPRESSED, 0x01020304, b"abc")
    assert data == bytes.fromhex("00000003" "03" "03" "01020304") + b"abc"


def test_frame_type_and_flag_numbers() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 1, "OPEN": 2, "MESSAGE": 3, "END": 4, "STATUS": 5,
        "RESET": 6, "WINDOW": 7, "PING": 8, "PONG": 9, "GOAWAY": 10,
    }
    assert int(FrameFlag.COMPRESSED) == 1
    assert int(FrameFlag.END_STREAM) == 2
    assert CONTROL_FRAME_LIMIT == 64 * 1024
    assert MAX_STREAM_ID == 2**31 - 1


def test_round_trip_every_type() -> None:
    frames = [
        (int(FrameType.HELLO), 0, 0, b"\x80"),
        (int(FrameType.OPEN), 0, 1, b"\x93\xa3a/b\xc0\x80"),
        (int(FrameType.MESSAGE), 3, 1, b"payload"),
        (int(FrameType.END), 0, 1, b""),
        (int(FrameType.STATUS), 0, 1, b"\x93\x00\xa0\xc0"),
        (int(FrameType.RESET), 0, 3, b"\x92\x01\xa0"),
        (int(FrameType.WINDOW), 0, 0, struct.pack("!I", 5)),
        (int(FrameType.PING), 0, 0, b"12345678"),
        (int(FrameType.PONG), 0, 0, b"12345678"),
        (int(FrameType.GOAWAY), 0, 0, b"\x93\x00\x00\xa0"),
    ]
    data = b"".join(encode_frame(*f) for f in frames)
    dec = FrameDecoder(1024)
    assert dec.feed(data) == frames
    assert dec.buffered == 0


def test_incremental_byte_by_byte() -> None:
    frames = [(3, 0, 1, b"x" * 37), (4, 0, 1, b""), (8, 0, 0, b"abcdefgh"), (3, 2, 5, b"")]
    data = b"".join(encode_frame(*f) for f in frames)
    dec = FrameDecoder(1024)
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
        # never more buffered than one incomplete frame
        assert dec.buffered < HEADER_SIZE + 37
    assert got == frames
    assert dec.buffered == 0


def test_partial_header_then_rest_in_one_chunk() -> None:
    data = encode_frame(3, 0, 1, b"hello") + encode_frame(3, 0, 1, b"world")
    dec = FrameDecoder(1024)
    assert dec.feed(data[:4]) == []
    assert dec.buffered == 4
    assert dec.feed(data[4:]) == [(3, 0, 1, b"hello"), (3, 0, 1, b"world")]
    assert dec.buffered == 0


def test_feed_empty_is_noop() -> None:
    dec = FrameDecoder(1024)
    assert dec.feed(b"") == []
    dec.feed(b"\x00\x00")
    assert dec.feed(b"") == []
    assert dec.buffered == 2


# ------------------------------------------------------------------ limits


def test_message_at_limit_is_accepted() -> None:
    dec = FrameDecoder(100)
    assert dec.feed(encode_frame(3, 0, 1, b"x" * 100)) == [(3, 0, 1, b"x" * 100)]


def test_message_above_limit_rejected_on_header_alone() -> None:
    dec = FrameDecoder(100)
    with pytest.raises(ProtocolError) as info:
        dec.feed(header(101, FrameType.MESSAGE, 0, 1))  # no payload sent at all
    assert info.value.code is Status.RESOURCE_EXHAUSTED


def test_huge_length_rejected_without_buffering() -> None:
    dec = FrameDecoder(4 * 1024 * 1024)
    with pytest.raises(ProtocolError) as info:
        dec.feed(header(2**32 - 1, FrameType.MESSAGE, 0, 1) + b"abc")
    assert info.value.code is Status.RESOURCE_EXHAUSTED


def test_header_split_then_rejected_when_complete() -> None:
    dec = FrameDecoder(100)
    h = header(1000, FrameType.MESSAGE, 0, 1)
    assert dec.feed(h[:9]) == []
    with pytest.raises(ProtocolError):
        dec.feed(h[9:])


@pytest.mark.parametrize("ftype", [t for t in FrameType if t is not FrameType.MESSAGE])
def test_control_frame_limit(ftype: FrameType) -> None:
    # the control limit applies to every non-MESSAGE frame, independently of max_message_size
    dec = FrameDecoder(10 * CONTROL_FRAME_LIMIT)
    assert dec.feed(header(CONTROL_FRAME_LIMIT + 1, ftype, 0, 0)[:HEADER_SIZE - 1]) == []
    with pytest.raises(ProtocolError) as info:
        dec.feed(header(CONTROL_FRAME_LIMIT + 1, ftype, 0, 0)[HEADER_SIZE - 1:])
    assert info.value.code is Status.RESOURCE_EXHAUSTED
    ok = FrameDecoder(10)
    payload = b"\x00" * CONTROL_FRAME_LIMIT
    assert ok.feed(encode_frame(ftype, 0, 0, payload)) == [(int(ftype), 0, 0, payload)]


@pytest.mark.parametrize("ftype", [0, 11, 0x7F, 0xFF])
def test_unknown_type(ftype: int) -> None:
    dec = FrameDecoder(100)
    with pytest.raises(ProtocolError) as info:
        dec.feed(header(0, ftype, 0, 0))
    assert info.value.code is Status.INTERNAL


def test_unknown_type_after_valid_frame() -> None:
    dec = FrameDecoder(100)
    with pytest.raises(ProtocolError):
        dec.feed(encode_frame(3, 0, 1, b"ok") + header(0, 0x0B, 0, 0))


@pytest.mark.parametrize("sid", [2**31, 2**31 + 1, 2**32 - 1])
def test_stream_id_above_2_31_rejected(sid: int) -> None:
    dec = FrameDecoder(100)
    with pytest.raises(ProtocolError) as info:
        dec.feed(header(5, FrameType.MESSAGE, 0, sid))  # payload not yet there
    assert info.value.code is Status.INTERNAL


def test_max_stream_id_accepted() -> None:
    dec = FrameDecoder(100)
    assert dec.feed(encode_frame(3, 0, MAX_STREAM_ID, b"")) == [(3, 0, MAX_STREAM_ID, b"")]


def test_unknown_flags_are_passed_through() -> None:
    dec = FrameDecoder(100)
    assert dec.feed(encode_frame(3, 0xFC, 1, b"")) == [(3, 0xFC, 1, b"")]


# -------------------------------------------------------------- properties

frame_st = st.one_of(
    st.tuples(st.just(int(FrameType.MESSAGE)), st.integers(0, 255), st.integers(0, MAX_STREAM_ID),
              st.binary(max_size=300)),
    st.tuples(st.sampled_from([int(t) for t in FrameType if t is not FrameType.MESSAGE]),
              st.integers(0, 255), st.integers(0, MAX_STREAM_ID), st.binary(max_size=64)),
)


@HYPO
@given(frames=st.lists(frame_st, max_size=20), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_round_trip_arbitrary_frames(frames: list[tuple[int, int, int, bytes]], cuts: list[int]) -> None:
    data = b"".join(encode_frame(*f) for f in frames)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    dec = FrameDecoder(300, control_limit=64)
    got = []
    for a, b in itertools.pairwise(points):
        got += dec.feed(data[a:b])
        assert dec.buffered < HEADER_SIZE + 300
    assert got == frames
    assert dec.buffered == 0


@HYPO
@given(data=st.binary(max_size=400), chunk=st.integers(1, 50))
def test_any_bytes_decode_or_protocol_error(data: bytes, chunk: int) -> None:
    dec = FrameDecoder(64, control_limit=32)
    try:
        for i in range(0, len(data), chunk):
            for ftype, flags, sid, payload in dec.feed(data[i:i + chunk]):
                assert 1 <= ftype <= 10
                assert 0 <= flags <= 255
                assert 0 <= sid <= MAX_STREAM_ID
                assert len(payload) <= (64 if ftype == FrameType.MESSAGE else 32)
            assert dec.buffered < HEADER_SIZE + 64
    except ProtocolError as exc:
        assert isinstance(exc.code, Status)
