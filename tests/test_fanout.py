"""FanOut: exactly-once in-order delivery after each sink's start, gap detection and repair."""

from __future__ import annotations

from zrpc.fanout import FanOut
from zrpc.status import Status


class Sink:
    def __init__(self, capacity: int = 10**9) -> None:
        self.got: list[bytes] = []
        self.aborted: tuple[Status, str] | None = None
        self.capacity = capacity

    def deliver(self, payload: bytes) -> bool:
        if len(self.got) >= self.capacity:
            return False
        self.got.append(payload)
        return True

    def abort(self, code: Status, message: str) -> None:
        self.aborted = (code, message)


def ev(i: int) -> bytes:
    return f"e{i}".encode()


def test_delivers_only_after_start_seq_in_order() -> None:
    f = FanOut()
    a, b = Sink(), Sink()
    assert f.attach("r", a, 0) is True
    f.publish("r", 1, ev(1))
    assert f.attach("r", b, 1) is False
    for i in (2, 3):
        f.publish("r", i, ev(i))
    f.publish("r", 3, ev(3))  # duplicate is dropped
    assert a.got == [ev(1), ev(2), ev(3)]
    assert b.got == [ev(2), ev(3)]


def test_gap_is_held_then_repaired_in_order() -> None:
    asked: list[tuple[str, int, int | None]] = []
    f = FanOut(on_gap=lambda t, a, u: asked.append((t, a, u)))
    s = Sink()
    f.attach("r", s, 0)
    f.publish("r", 1, ev(1))
    f.publish("r", 4, ev(4))  # 2 and 3 were dropped by the bus
    f.publish("r", 5, ev(5))
    assert asked == [("r", 1, 3)]
    assert s.got == [ev(1)], "events after a gap wait for the repair"
    f.repair("r", [(2, ev(2)), (3, ev(3))])
    assert s.got == [ev(i) for i in range(1, 6)]
    assert f.gaps == 1 and f.repairs == 1


def test_tail_gap_found_by_observe() -> None:
    asked: list[tuple[str, int, int | None]] = []
    f = FanOut(on_gap=lambda t, a, u: asked.append((t, a, u)))
    s = Sink()
    f.attach("r", s, 0)
    f.publish("r", 1, ev(1))
    f.observe("r", 3)  # the shard's heartbeat says it published up to 3
    assert asked == [("r", 1, 3)]
    f.repair("r", [(2, ev(2)), (3, ev(3))])
    assert s.got == [ev(1), ev(2), ev(3)]


def test_unrepairable_gap_aborts_streams_with_resume_status() -> None:
    f = FanOut(on_gap=lambda *a: None)
    s = Sink()
    f.attach("r", s, 0)
    f.publish("r", 2, ev(2))
    f.repair("r", None)
    assert s.aborted is not None and s.aborted[0] is Status.ABORTED
    assert "resume" in s.aborted[1]
    assert "r" not in f.topics


def test_late_attacher_catches_up_from_ring() -> None:
    f = FanOut()
    a, late = Sink(), Sink()
    f.attach("r", a, 0)
    for i in range(1, 6):
        f.publish("r", i, ev(i))
    f.attach("r", late, 2)  # its snapshot was taken at seq 2; 3..5 already went by
    f.publish("r", 6, ev(6))
    assert late.got == [ev(3), ev(4), ev(5), ev(6)]


def test_sink_that_fails_is_detached_and_others_continue() -> None:
    emptied: list[str] = []
    f = FanOut(on_empty=emptied.append)
    full, ok = Sink(capacity=1), Sink()
    f.attach("r", full, 0)
    f.attach("r", ok, 0)
    for i in range(1, 4):
        f.publish("r", i, ev(i))
    assert ok.got == [ev(1), ev(2), ev(3)]
    assert full.got == [ev(1)]
    assert full not in f.topics["r"].sinks
    f.detach("r", ok)
    assert emptied == ["r"]


def test_pending_buffer_is_bounded() -> None:
    f = FanOut(max_pending=3, on_gap=lambda *a: None)
    s = Sink()
    f.attach("r", s, 0)
    for i in range(2, 7):  # seq 1 never arrives; the hold buffer overflows
        f.publish("r", i, ev(i))
    assert s.aborted is not None and s.aborted[0] is Status.ABORTED
    assert "r" not in f.topics


def test_an_attach_overtaken_by_a_later_one_is_caught_up_from_the_shard() -> None:
    """b's ATTACH (snapshot 1) reaches the broker before a's (snapshot 0): nothing was delivered
    yet, so a gets event 1 from the shard instead of an ABORTED stream; b never sees it."""
    gaps: list[tuple[str, int, int]] = []
    f = FanOut(on_gap=lambda topic, after, upto: gaps.append((topic, after, upto)))
    a, b = Sink(), Sink()
    assert f.attach("r", b, 1) is True
    assert f.attach("r", a, 0) is False
    assert a.aborted is None
    assert gaps == [("r", 0, 1)]
    f.publish("r", 2, ev(2))       # held until the repair fills 1
    f.repair("r", [(1, ev(1))])
    f.publish("r", 3, ev(3))
    assert a.got == [ev(1), ev(2), ev(3)]
    assert b.got == [ev(2), ev(3)]
