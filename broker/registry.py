"""The broker's worker table (sans-IO, clock passed in).

Workers register READY-first with their shard; the registry maps shards to
workers, merges the method tables they announce, and expires a worker that
has been silent for ``liveness x interval`` (the zguide's Paranoid Pirate).
A shard has one worker at a time: a second READY for it is refused, unless
it carries a higher shard-lease token (``lease``, :mod:`workers.lease`) than
the registered worker, which it then supersedes (the old one lost its lease).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MethodRoute", "Refusal", "WorkerInfo", "WorkerRegistry"]


class Refusal(ValueError):
    """Why a worker's READY is refused; ``fatal``: it can never succeed (the worker should exit)."""

    def __init__(self, reason: str, *, fatal: bool) -> None:
        super().__init__(reason)
        self.fatal = fatal


@dataclass(frozen=True)
class MethodRoute:
    name: str
    kind: str              # unary | client_stream | server_stream | bidi
    shard_key: str | None


@dataclass
class WorkerInfo:
    identity: bytes
    shard: int
    shards: int
    pid: int
    settings: dict[str, Any]
    bus: str | None
    expiry: float
    methods: list[dict[str, Any]] = field(default_factory=list)
    lease: int | None = None
    epoch: int = 0                  # the worker's session epoch for this broker (READY)


class WorkerRegistry:
    """Shard table + liveness (see module docstring)."""

    def __init__(self, shards: int, interval: float, liveness: int) -> None:
        self.shards = shards
        self.interval = interval
        self.liveness = liveness
        self.by_identity: dict[bytes, WorkerInfo] = {}
        self.by_shard: dict[int, WorkerInfo] = {}
        self.methods: dict[str, MethodRoute] = {}
        self._rr = itertools.count()

    @property
    def ttl(self) -> float:
        return self.interval * self.liveness

    def register(self, identity: bytes, info: dict[str, Any], now: float) -> WorkerInfo:
        """Add a worker; raises :class:`Refusal` with the reason to send back when refused."""
        shard, shards = info.get("shard"), info.get("shards")
        if type(shard) is not int or type(shards) is not int:
            raise Refusal("READY must carry integer shard and shards", fatal=True)
        if shards != self.shards:
            raise Refusal(f"worker is configured for {shards} shards; this broker runs {self.shards}",
                          fatal=True)
        if not 0 <= shard < shards:
            raise Refusal(f"shard {shard} out of range 0..{shards - 1}", fatal=True)
        lease = info.get("lease")
        if lease is not None and type(lease) is not int:
            raise Refusal("READY lease token must be an integer", fatal=True)
        current = self.by_shard.get(shard)
        if current is not None and current.identity != identity:  # may heal: that worker may die
            if lease is None or (current.lease is not None and lease <= current.lease):
                raise Refusal(f"shard {shard} is already served by pid {current.pid}", fatal=False)
            self.remove(current.identity)  # superseded: the caller fails its streams
        methods = info.get("methods") or []
        w = WorkerInfo(identity, shard, shards, int(info.get("pid") or 0),
                       dict(info.get("settings") or {}), info.get("bus"), now + self.ttl, methods,
                       lease, int(info.get("epoch") or 0))
        self.by_identity[identity] = w
        self.by_shard[shard] = w
        for m in methods:
            self.methods[m["name"]] = MethodRoute(m["name"], m["kind"], m.get("shard_key"))
        return w

    def heard(self, identity: bytes, now: float) -> WorkerInfo | None:
        w = self.by_identity.get(identity)
        if w is not None:
            w.expiry = now + self.ttl
        return w

    def remove(self, identity: bytes) -> WorkerInfo | None:
        w = self.by_identity.pop(identity, None)
        if w is not None and self.by_shard.get(w.shard) is w:
            del self.by_shard[w.shard]
        return w

    def expired(self, now: float) -> list[WorkerInfo]:
        dead = [w for w in self.by_identity.values() if w.expiry < now]
        for w in dead:
            self.remove(w.identity)
        return dead

    def remove_pid(self, pid: int) -> WorkerInfo | None:
        for w in list(self.by_identity.values()):
            if w.pid == pid:
                return self.remove(w.identity)
        return None

    def for_shard(self, shard: int) -> WorkerInfo | None:
        return self.by_shard.get(shard)

    def any_worker(self) -> WorkerInfo | None:
        live = list(self.by_identity.values())
        if not live:
            return None
        return live[next(self._rr) % len(live)]

    def all_shards_owned(self) -> bool:
        return len(self.by_shard) == self.shards
