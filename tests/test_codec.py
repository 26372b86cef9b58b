"""Typed messages (zrpc.codec): dataclass <-> MessagePack, validation, compression."""

from __future__ import annotations

import dataclasses
import enum
import zlib
from typing import Any, Optional

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zrpc.codec import DecodeError, compress, decode, decoder_for, decompress, encode, to_wire


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclasses.dataclass
class Point:
    x: float
    y: float = 0.0


@dataclasses.dataclass
class Shape:
    name: str
    points: list[Point]
    color: Color
    tags: dict[str, int] = dataclasses.field(default_factory=dict)
    parent: Point | None = None
    note: Optional[str] = None  # noqa: UP045 - the typing.Optional spelling must work too
    blob: bytes = b""
    visible: bool = True
    count: int = 0
    extra: Any = None


@dataclasses.dataclass
class Tree:
    value: int
    children: list[Tree] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Bad:
    a: int
    b: set[int] = dataclasses.field(default_factory=set)  # not a supported field type
    c: str = "x"


@dataclasses.dataclass
class Outer:
    bad: Bad


def sample() -> Shape:
    return Shape(
        name="tri",
        points=[Point(0.5, 1.0), Point(-2.25)],
        color=Color.GREEN,
        tags={"a": 1, "b": -7},
        parent=Point(9.0, 9.5),
        note="hello",
        blob=b"\x00\xff",
        visible=False,
        count=2**40,
        extra={"k": [1, "two", None]},
    )


# ------------------------------------------------------------ round trips


def test_round_trip_nested() -> None:
    s = sample()
    assert decode(Shape, encode(s)) == s


def test_round_trip_defaults_and_none() -> None:
    s = Shape(name="", points=[], color=Color.RED)
    assert decode(Shape, encode(s)) == s


def test_wire_form_is_a_map_of_field_names() -> None:
    raw = msgpack.unpackb(encode(sample()), raw=False)
    assert raw["name"] == "tri"
    assert raw["points"] == [{"x": 0.5, "y": 1.0}, {"x": -2.25, "y": 0.0}]
    assert raw["color"] == "green"
    assert raw["parent"] == {"x": 9.0, "y": 9.5}
    assert raw["blob"] == b"\x00\xff"
    assert to_wire(Point(1.0, 2.0)) == {"x": 1.0, "y": 2.0}
    assert to_wire([Color.RED, (Point(1.0),)]) == ["red", [{"x": 1.0, "y": 0.0}]]


def test_self_referencing_dataclass() -> None:
    t = Tree(1, [Tree(2), Tree(3, [Tree(4)])])
    assert decode(Tree, encode(t)) == t
    with pytest.raises(DecodeError):
        decode(Tree, encode({"value": 1, "children": [{"value": "x"}]}))


def test_float_field_accepts_int() -> None:
    p = decode(Point, msgpack.packb({"x": 3, "y": -1}))
    assert p == Point(3.0, -1.0)
    assert type(p.x) is float and type(p.y) is float


def test_unknown_keys_ignored() -> None:
    data = msgpack.packb({"x": 1.5, "z": "new field", "nested": {"a": [1]}})
    assert decode(Point, data) == Point(1.5)


def test_missing_optional_takes_default() -> None:
    data = msgpack.packb({"name": "n", "points": [], "color": "red"})
    assert decode(Shape, data) == Shape(name="n", points=[], color=Color.RED)


def test_plain_decode_unchecked() -> None:
    assert decode(None, msgpack.packb({"a": [1, 2]})) == {"a": [1, 2]}
    assert decode(dict, msgpack.packb([1, "x"])) == [1, "x"]


# ------------------------------------------------------------------ errors


def base() -> dict[str, Any]:
    return {"name": "n", "points": [{"x": 1.0}], "color": "red"}


@pytest.mark.parametrize(
    "patch",
    [
        {"name": 5},
        {"name": b"bytes"},
        {"points": {"x": 1.0}},
        {"points": [{"x": "1"}]},
        {"points": [[1.0, 2.0]]},
        {"color": "blue"},
        {"color": ["red"]},
        {"tags": {"a": "1"}},
        {"tags": [1]},
        {"parent": 3},
        {"note": 3},
        {"blob": "str"},
        {"visible": 1},
        {"count": True},
        {"count": 1.5},
    ],
    ids=repr,
)
def test_wrong_types_rejected(patch: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        decode(Shape, msgpack.packb({**base(), **patch}))


def test_bool_is_not_an_int_and_int_is_not_a_bool() -> None:
    with pytest.raises(DecodeError):
        decode(Point, msgpack.packb({"x": True}))


def test_dict_with_non_string_keys_rejected() -> None:
    with pytest.raises(DecodeError):
        decode(Shape, msgpack.packb({**base(), "tags": {1: 1}}))


@pytest.mark.parametrize("field", ["name", "points", "color"])
def test_missing_required_field(field: str) -> None:
    body = base()
    del body[field]
    with pytest.raises(DecodeError, match=field):
        decode(Shape, msgpack.packb(body))


@pytest.mark.parametrize("value", [[1, 2], "text", 3, None, b"\x00"])
def test_non_map_rejected(value: Any) -> None:
    with pytest.raises(DecodeError):
        decode(Point, msgpack.packb(value))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", b"\x81\xa1x", b"\xa2\xff\xfe", msgpack.packb({"x": 1.0}) + b"\x00",
     b"\x81\x91\x01\x02"],
    ids=repr,
)
def test_invalid_msgpack(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(Point, data)
    with pytest.raises(DecodeError):
        decode(None, data)


def test_post_init_errors_become_decode_errors() -> None:
    @dataclasses.dataclass
    class Positive:
        n: int

        def __post_init__(self) -> None:
            if self.n <= 0:
                raise ValueError("n must be positive")

    assert decode(Positive, msgpack.packb({"n": 1})) == Positive(1)
    with pytest.raises(DecodeError, match="positive"):
        decode(Positive, msgpack.packb({"n": 0}))


def test_unsupported_field_type_fails_every_time() -> None:
    # A message type the codec cannot handle must not leave a half-built
    # decoder in the cache that silently skips the remaining fields.
    for _ in range(2):
        with pytest.raises(TypeError, match="unsupported"):
            decoder_for(Bad)
        with pytest.raises(TypeError, match="unsupported"):
            decode(Outer, msgpack.packb({"bad": {"a": 1, "c": 5}}))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_decode_error(data: bytes) -> None:
    try:
        decode(Shape, data)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(max_size=20),
    xs=st.lists(st.floats(allow_nan=False), max_size=5),
    tags=st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1), max_size=5),
    color=st.sampled_from(Color),
    note=st.none() | st.text(max_size=5),
)
def test_round_trip_property(name: str, xs: list[float], tags: dict[str, int], color: Color,
                             note: str | None) -> None:
    s = Shape(name=name, points=[Point(x) for x in xs], color=color, tags=tags, note=note)
    assert decode(Shape, encode(s)) == s


# ------------------------------------------------------------- compression


def test_compress_threshold() -> None:
    data = b"a" * 100
    assert compress(data, None) == (data, False)
    assert compress(data, 100) == (data, False)  # not above the threshold
    packed, flag = compress(data, 99)
    assert flag is True and len(packed) < len(data)
    assert decompress(packed, 100) == data


def test_compress_skipped_when_it_does_not_help() -> None:
    data = bytes(range(256))  # incompressible at this size
    assert compress(data, 0) == (data, False)


def test_decompress_exact_limit_ok() -> None:
    data = b"z" * 5000
    assert decompress(zlib.compress(data), 5000) == data


def test_decompression_bomb_refused() -> None:
    bomb = zlib.compress(b"\x00" * 10_000_000, 9)
    assert len(bomb) < 20_000
    with pytest.raises(DecodeError, match="beyond"):
        decompress(bomb, 1024 * 1024)
    with pytest.raises(DecodeError):
        decompress(zlib.compress(b"x" * 5001), 5000)


def test_decompress_invalid_data() -> None:
    with pytest.raises(DecodeError):
        decompress(b"not zlib at all", 1000)


def test_decompress_truncated_or_trailing_garbage() -> None:
    packed = zlib.compress(bytes(range(100)) * 10)
    with pytest.raises(DecodeError):
        decompress(packed[:-6], 10_000)
    with pytest.raises(DecodeError):
        decompress(packed[:-1], 10_000)  # checksum cut short
    with pytest.raises(DecodeError):
        decompress(b"", 10_000)
    with pytest.raises(DecodeError):
        decompress(packed + b"junk", 10_000)
