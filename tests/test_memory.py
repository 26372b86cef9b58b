"""zrpc/memory.py: the allocator settings apply and the trimmer trims only after closes, rate-limited."""

from __future__ import annotations

import pytest

from zrpc import memory
from zrpc.memory import Trimmer, tune_allocator


def test_tune_allocator_on_glibc() -> None:
    assert memory._LIBC is not None, "this test machine runs glibc"
    assert tune_allocator() is True


def test_trimmer_trims_after_closes_at_most_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    calls: list[int] = []

    class FakeLibc:
        def malloc_trim(self, pad: int) -> int:
            calls.append(pad)
            return 1

    monkeypatch.setattr(memory, "_LIBC", FakeLibc())
    monkeypatch.setattr(memory.time, "monotonic", lambda: now[0])
    t = Trimmer(interval=1.0, rounds=2)
    t.tick()
    assert calls == []  # nothing closed: an idle server never trims
    t.closed()
    t.tick()
    t.tick()  # same instant: rate-limited
    assert calls == [0]
    now[0] += 1.0
    t.tick()  # the second of the 2 rounds after the close
    now[0] += 1.0
    t.tick()  # no close since: stops
    assert calls == [0, 0] and t.trims == 2
