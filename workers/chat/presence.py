"""Caps on the distinct user names one client may make present: pure bookkeeping, no I/O.

Presence is what makes a room expensive for everybody else: every user that
becomes present publishes ``user_joined`` to every stream of the room, so a
client that joins under many distinct names costs the shard (and the broker)
deliveries in proportion to the room's size for each name. Streams of one
name are refcounted and cost nothing more, so the lever is the number of
distinct names, and that is what :class:`PresenceGuard` bounds:

* per connection: at most ``per_connection`` distinct names across the
  presence streams (``SubscribeToRoom``, ``JoinChat``) of one client
  connection, authenticated or not (an authenticated connection has one name,
  its identity);
* per client IP, for unauthenticated connections only: at most ``per_ip``
  distinct names across all of that IP's connections (on this shard).

A stream that would pass a cap is refused with RESOURCE_EXHAUSTED before it
becomes present. ``admit``/``release`` are refcounted per (key, name).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

__all__ = ["PresenceGuard", "client_ip"]


def client_ip(peer: str | None) -> str | None:
    """The IP of a ``host:port`` / ``[v6]:port`` peer string (None when unknown)."""
    if not peer or ":" not in peer:
        return None
    host = peer.rsplit(":", 1)[0]
    return host.strip("[]") or None


class PresenceGuard:
    """Distinct presence names per connection and per unauthenticated IP (see module docstring)."""

    def __init__(self, per_connection: int, per_ip: int) -> None:
        if per_connection < 1 or per_ip < 1:
            raise ValueError("presence caps must be >= 1")
        self.per_connection = per_connection
        self.per_ip = per_ip
        self._by_conn: dict[Hashable, Counter[str]] = {}
        self._by_ip: dict[Hashable, Counter[str]] = {}

    def admit(self, conn: Hashable, ip: str | None, user: str) -> str | None:
        """Count one presence stream of ``user``; the reason it is refused (None: admitted).

        ``ip`` is given for unauthenticated connections only.
        """
        names = self._by_conn.get(conn)
        if names is not None and user not in names and len(names) >= self.per_connection:
            return (f"this connection already keeps {len(names)} distinct user names present "
                    f"(the limit is {self.per_connection}); open another connection or reuse a name")
        if ip is not None:
            by_ip = self._by_ip.get(ip)
            if by_ip is not None and user not in by_ip and len(by_ip) >= self.per_ip:
                return (f"unauthenticated connections from {ip} already keep {len(by_ip)} distinct "
                        f"user names present (the limit is {self.per_ip}); authenticate or reuse a name")
            self._by_ip.setdefault(ip, Counter())[user] += 1
        self._by_conn.setdefault(conn, Counter())[user] += 1
        return None

    def release(self, conn: Hashable, ip: str | None, user: str) -> None:
        """Undo one successful :meth:`admit` with the same arguments."""
        _drop(self._by_conn, conn, user)
        if ip is not None:
            _drop(self._by_ip, ip, user)

    def names(self, conn: Hashable) -> int:
        """Distinct names ``conn`` keeps present."""
        return len(self._by_conn.get(conn, ()))


def _drop(table: dict[Hashable, Counter[str]], key: Hashable, user: str) -> None:
    names = table.get(key)
    if names is None:
        return
    names[user] -= 1
    if names[user] <= 0:
        del names[user]
        if not names:
            del table[key]
