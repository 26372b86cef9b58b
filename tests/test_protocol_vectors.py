"""The conformance vectors (tests/vectors/protocol.json) against the sans-IO reference connection.

The same file is run by the JavaScript client's tests (zrpc/web/test/vectors.test.js),
so both implementations, and any third one, agree on what goes out for what
comes in. Each case starts a :class:`~zrpc.protocol.Connection` in the case's
role, applies its steps and compares the frames it queued with the case's
``out`` (see the file's ``format``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from zrpc.protocol.connection import Connection, Role
from zrpc.protocol.frames import FrameDecoder, FrameType

VECTORS = json.loads((Path(__file__).parent / "vectors" / "protocol.json").read_text())
CASES = VECTORS["cases"]


def start(case: dict[str, Any]) -> Connection:
    role = Role.SERVER if case["role"] == "server" else Role.CLIENT
    conn = Connection(role)
    peer_hello = bytes.fromhex(VECTORS["peer_hello"][case["role"]])
    if case["start"] == "fresh":
        return conn
    if role is Role.CLIENT:
        conn.send_hello()
        if case["start"] == "ready":
            conn.receive_data(peer_hello)
    else:
        assert case["start"] == "ready", case["start"]
        conn.receive_data(peer_hello)
        conn.send_hello()
    assert conn.peer is not None or case["start"] == "hello_sent"
    conn.data_to_send()
    return conn


def frames_out(conn: Connection) -> list[dict[str, Any]]:
    got = []
    for ftype, _flags, sid, payload in FrameDecoder(2**32 - 1).feed(conn.data_to_send()):
        name = FrameType(ftype).name
        f: dict[str, Any] = {"type": name, "stream": sid}
        if name in ("RESET", "STATUS"):
            f["code"] = msgpack.unpackb(payload)[0]
        elif name == "GOAWAY":
            last, code, _ = msgpack.unpackb(payload)
            f["last_stream_id"], f["code"] = last, code
        elif name in ("PING", "PONG"):
            f["payload"] = payload.hex()
        got.append(f)
    return got


def matches(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return all(got.get(k) == v for k, v in want.items())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector(case: dict[str, Any]) -> None:
    conn = start(case)
    for i, step in enumerate(case["steps"]):
        if "in" in step:
            conn.receive_data(bytes.fromhex(step["in"]))
        elif step["do"] == "goaway":
            conn.goaway()
        elif step["do"] == "close":
            conn.close(step["code"], "closing")
        elif step["do"] == "open":
            conn.open_stream(step["method"])
        else:
            raise AssertionError(f"unknown step {step}")
        got = frames_out(conn)
        want = step["out"]
        assert len(got) == len(want) and all(map(matches, got, want)), (
            f"step {i} ({step['note']}): sent {got}, expected {want}")
        if step.get("closed") is not None:
            assert conn.closed is step["closed"], f"step {i} ({step['note']}): closed={conn.closed}"


def test_the_vectors_cover_both_roles_and_every_section_they_name() -> None:
    assert {c["role"] for c in CASES} == {"server", "client"}
    assert len({c["name"] for c in CASES}) == len(CASES)
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    for c in CASES:
        assert f"## {c['section'].split('.')[0]}." in doc
