"""zrpc.packing: a reused packer per thread gives msgpack.packb's bytes, also after a failure."""

from __future__ import annotations

import threading
from typing import Any

import msgpack
import pytest

from zrpc.packing import packb, packer_with

VALUES: list[Any] = [None, 0, -1, 2**63 - 1, "x" * 300, b"\0" * 70_000, [1, [2, {"a": "b"}]],
                     {"method": "Echo/Say", "meta": {}}, 1.5, True]


def test_same_bytes_as_msgpack_packb() -> None:
    for v in VALUES:
        assert packb(v) == msgpack.packb(v)


def test_a_failed_pack_leaves_nothing_behind() -> None:
    with pytest.raises(TypeError):
        packb([1, object()])
    assert packb({"a": 1}) == msgpack.packb({"a": 1})


def test_default_hook_and_threads_do_not_mix_buffers() -> None:
    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    pack = packer_with(lambda p: {"x": p.x})
    errors: list[str] = []

    def work(k: int) -> None:
        for i in range(2000):
            got = msgpack.unpackb(pack([k, Point(i), "pad" * (i % 7)]))
            if got != [k, {"x": i}, "pad" * (i % 7)]:
                errors.append(f"thread {k}: {got!r}")
                return

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
