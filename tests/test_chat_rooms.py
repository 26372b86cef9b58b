"""Tests of workers.chat.rooms: id assignment, presence refcounts, bounded rings."""

from __future__ import annotations

import pytest

from workers.chat.rooms import Member, RoomTable
from workers.chat.store import StoredMessage


def test_ids_are_gapless_per_room() -> None:
    table = RoomTable()
    a = [table.next_message("a", "ann", f"hi {i}", now_ms=1000 + i) for i in range(5)]
    b = [table.next_message("b", "bob", "yo", now_ms=7) for _ in range(3)]
    assert [m.id for m in a] == [1, 2, 3, 4, 5]
    assert [m.id for m in b] == [1, 2, 3]
    assert a[2] == StoredMessage("a", 3, "ann", "hi 2", 1002)
    assert table.room("a").last_id == 5
    assert table.last_id("b") == 3


def test_restart_continues_from_last_ids() -> None:
    table = RoomTable(last_ids={"a": 41, "b": 7})
    assert table.last_id("a") == 41
    assert "a" not in table  # not materialised until used
    assert table.next_message("a", "u", "x", 0).id == 42
    assert table.next_message("a", "u", "x", 0).id == 43
    assert table.next_message("new", "u", "x", 0).id == 1
    assert table.room("b").last_id == 7


def test_message_count_only_for_present_members() -> None:
    table = RoomTable()
    table.join("r", "ann", now_ms=1)
    table.next_message("r", "ann", "1", 2)
    table.next_message("r", "ann", "2", 3)
    table.next_message("r", "ghost", "3", 4)  # not a member: no presence entry created
    assert [(m.name, m.message_count) for m in table.members("r")] == [("ann", 2)]


def test_presence_refcounts_streams() -> None:
    table = RoomTable()
    assert table.join("r", "ann", now_ms=10) is True  # broadcast user_joined
    assert table.join("r", "ann", now_ms=20) is False  # second stream: silent
    assert table.members("r") == [Member("ann", joined_at=10, message_count=0, streams=2)]
    assert table.leave("r", "ann") is False  # one stream remains
    assert [m.streams for m in table.members("r")] == [1]
    assert table.leave("r", "ann") is True  # broadcast user_left
    assert table.members("r") == []
    assert table.leave("r", "ann") is False  # no error when absent
    assert table.leave("nowhere", "ann") is False
    assert "nowhere" not in table
    assert table.join("r", "ann", now_ms=30) is True  # rejoin is a new presence
    assert table.members("r")[0].joined_at == 30


def test_members_sorted_by_join_time_then_name() -> None:
    table = RoomTable()
    table.join("r", "zed", now_ms=5)
    table.join("r", "bob", now_ms=9)
    table.join("r", "amy", now_ms=9)
    table.join("r", "cat", now_ms=1)
    assert [m.name for m in table.members("r")] == ["cat", "zed", "amy", "bob"]
    assert table.members("empty") == []


def test_record_event_numbers_sequentially() -> None:
    table = RoomTable()
    assert [table.record_event("r", b"e%d" % i) for i in range(1, 4)] == [1, 2, 3]
    assert table.record_event("other", b"x") == 1
    assert table.events_after("r", 0) == [(1, b"e1"), (2, b"e2"), (3, b"e3")]
    assert table.events_after("r", 1) == [(2, b"e2"), (3, b"e3")]
    assert table.events_after("r", 1, upto_seq=2) == [(2, b"e2")]
    assert table.events_after("r", 0, upto_seq=99) == [(1, b"e1"), (2, b"e2"), (3, b"e3")]
    assert table.events_after("r", 2, upto_seq=2) == []
    assert table.events_after("r", 3) == []


def test_events_after_ring_boundary() -> None:
    table = RoomTable(event_ring=4)
    for i in range(1, 11):
        table.record_event("r", bytes([i]))
    assert table.room("r").bus_seq == 10
    assert len(table.room("r").events) == 4  # ring holds seqs 7..10
    assert table.events_after("r", 6) == [(7, b"\x07"), (8, b"\x08"), (9, b"\x09"), (10, b"\x0a")]
    assert table.events_after("r", 8, upto_seq=9) == [(9, b"\x09")]
    assert table.events_after("r", 5) is None  # seq 6 fell out of the ring
    assert table.events_after("r", 0) is None
    assert table.events_after("r", 5, upto_seq=8) is None
    assert table.events_after("r", 10) == []
    assert table.events_after("r", 11) is None  # never issued (e.g. before a restart)
    assert table.events_after("r", -1) is None


def test_recent_after_ring_boundary() -> None:
    table = RoomTable(recent_limit=3)
    msgs = [table.next_message("r", "u", str(i), i) for i in range(1, 8)]
    assert [m.id for m in table.room("r").recent] == [5, 6, 7]
    assert table.recent_after("r", 4) == msgs[4:]
    assert table.recent_after("r", 6) == [msgs[6]]
    assert table.recent_after("r", 7) == []
    assert table.recent_after("r", 3) is None  # id 4 is no longer in the ring
    assert table.recent_after("r", 0) is None
    assert table.recent_after("unknown", 0) == []


def test_recent_after_restart_has_empty_ring() -> None:
    table = RoomTable(last_ids={"r": 100})
    assert table.recent_after("r", 100) == []
    assert table.recent_after("r", 99) is None  # history only in the store
    table.next_message("r", "u", "x", 0)
    assert [m.id for m in table.recent_after("r", 100) or []] == [101]
    assert table.recent_after("r", 99) is None


def test_zero_sized_rings() -> None:
    table = RoomTable(recent_limit=0, event_ring=0)
    table.next_message("r", "u", "x", 0)
    table.record_event("r", b"e")
    assert table.recent_after("r", 0) is None
    assert table.recent_after("r", 1) == []
    assert table.events_after("r", 0) is None
    assert table.events_after("r", 1) == []


def test_forget_idle_preserves_sequences_and_bounds_memory() -> None:
    table = RoomTable()
    table.join("r", "ann", 1)
    for _ in range(5):
        table.next_message("r", "ann", "x", 2)
    table.record_event("r", b"a")
    table.record_event("r", b"b")

    table.forget_idle("r")  # has a member: kept
    assert "r" in table

    table.leave("r", "ann")
    table.forget_idle("r")
    assert "r" not in table
    assert len(table) == 0
    assert table.last_id("r") == 5
    assert table.recent_after("r", 5) == []
    assert table.recent_after("r", 4) is None  # ring dropped: read the store
    assert table.events_after("r", 2) == []
    assert table.events_after("r", 1) is None

    assert table.next_message("r", "bob", "y", 3).id == 6
    assert table.record_event("r", b"c") == 3
    assert table.members("r") == []
    table.forget_idle("never-created")  # no error


def test_rings_stay_bounded() -> None:
    table = RoomTable(recent_limit=10, event_ring=20)
    for i in range(10_000):
        table.next_message("r", "u", "x", i)
        table.record_event("r", b"e")
    room = table.room("r")
    assert len(room.recent) == 10
    assert len(room.events) == 20
    assert room.last_id == 10_000
    assert room.bus_seq == 10_000


def test_invalid_ring_sizes() -> None:
    with pytest.raises(ValueError):
        RoomTable(recent_limit=-1)
    with pytest.raises(ValueError):
        RoomTable(event_ring=-1)
