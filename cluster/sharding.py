"""Stable shard selection: the same key maps to the same shard in every process.

Python's ``hash()`` is randomised per process, so it must never pick shards.
We use the first 8 bytes of BLAKE2b over the UTF-8 key.
"""

from __future__ import annotations

import hashlib

__all__ = ["shard_for", "stable_hash"]


def stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def shard_for(key: str, shards: int) -> int:
    """The shard (0..shards-1) that owns ``key``."""
    if shards < 1:
        raise ValueError("shards must be >= 1")
    return stable_hash(key) % shards
