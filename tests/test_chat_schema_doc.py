"""docs/chat.md's typed schema is the code's: field names and order, types, required, defaults.

And what it promises about the wire: the server sends every field (optional
ones as their default, nil included), and a decoder accepts a missing key.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from pathlib import Path
from typing import Any

import msgpack
import pytest

from zrpc.chat import BatchSummary, ChatResponse, Message, SubscribeRequest, User
from zrpc.codec import decode, encode

DOC = (Path(__file__).parents[1] / "docs" / "chat.md").read_text()
TABLED = [Message, BatchSummary, SubscribeRequest, ChatResponse, User]


def doc_table(name: str) -> list[list[str]]:
    """The rows of the table that follows the paragraph starting with `name`."""
    m = re.search(rf"^`{name}` (?:[^\n]*\n)+?\n\| field \|[^\n]*\n\|[-| ]+\n((?:\|[^\n]*\n)+)",
                  DOC, re.M)
    assert m, f"no schema table for {name} in docs/chat.md"
    rows = []
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append([c.replace("\\|", "|") for c in cells])
    return rows


def wire_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{wire_type(inner)} | nil"
    if origin is list:
        return f"list[{wire_type(typing.get_args(tp)[0])}]"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "str"
    return tp.__name__


def doc_default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return "nil" if f.default is None else f"`{f.default!r}`".replace("'", '"')
    if f.default_factory is not dataclasses.MISSING:
        return f"`{f.default_factory()!r}`"
    return ""


@pytest.mark.parametrize("cls", TABLED, ids=[c.__name__ for c in TABLED])
def test_the_schema_table_matches_the_dataclass(cls: type) -> None:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    rows = doc_table(cls.__name__)
    assert [r[0].strip("`") for r in rows] == [f.name for f in fields]
    for row, f in zip(rows, fields, strict=True):
        _, tp, required, default = row[:4]
        assert tp == wire_type(hints[f.name]), (cls.__name__, f.name, tp)
        is_required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        assert (required == "**yes**") == is_required, (cls.__name__, f.name, required)
        assert default == doc_default(f), (cls.__name__, f.name, default)


def test_every_field_is_sent_and_missing_keys_decode() -> None:
    event = ChatResponse.message_response(Message(id=1, user="a", content="hi", timestamp=2,
                                                  room="r"), seq=3)
    wire = msgpack.unpackb(encode(event))
    assert sorted(wire) == sorted(f.name for f in dataclasses.fields(ChatResponse))
    assert wire["user_left"] is None and wire["error_message"] is None  # sent as nil
    assert sorted(wire["message"]) == sorted(f.name for f in dataclasses.fields(Message))
    # a peer that leaves optional keys out is understood the same
    assert decode(ChatResponse, msgpack.packb({"type": "ack"})) == ChatResponse.ack_response()
    assert decode(Message, msgpack.packb({})) == Message()
