"""In-memory state of the chat rooms one shard owns: pure logic, no I/O.

Role
----
:class:`RoomTable` assigns message ids (1, 2, 3, ... per room, no gaps),
tracks presence with per-user stream refcounts, and keeps two bounded rings
per room: the most recent messages (served to resuming streams without
touching the store) and the most recent events published on the fan-out bus
(for gap repair).  Time is never read here; callers pass ``now_ms``.

Ids are assigned before the message is durable: the caller persists the
returned :class:`~workers.chat.store.StoredMessage` (``MessageStore.append``)
and a message in the ``recent`` ring may not be committed yet.

Memory stays bounded: both rings have a ``maxlen`` and a room without members
can be dropped with :meth:`RoomTable.forget_idle`; only its ``last_id`` and
``bus_seq`` (two integers) are kept so that a re-created room continues both
sequences.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

from workers.chat.store import StoredMessage

__all__ = ["Member", "Room", "RoomTable"]


@dataclass
class Member:
    """Presence entry of one user in one room.

    ``streams`` is how many live streams of this user are in the room; the
    user is present while it is > 0.
    """

    name: str
    joined_at: int
    message_count: int = 0
    streams: int = 0


@dataclass
class Room:
    """State of one room.

    ``last_id`` is the last message id assigned; ``bus_seq`` the last event
    sequence number published on the fan-out bus (messages and presence
    events).  ``recent`` holds the newest messages and ``events`` the newest
    ``(bus_seq, payload)`` pairs; both have contiguous ids/seqs ending at
    ``last_id``/``bus_seq``.
    """

    name: str
    last_id: int = 0
    bus_seq: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    recent: collections.deque[StoredMessage] = field(default_factory=collections.deque)
    events: collections.deque[tuple[int, bytes]] = field(default_factory=collections.deque)


class RoomTable:
    """The rooms of one shard (see the module docstring)."""

    def __init__(
        self,
        *,
        recent_limit: int = 1000,
        event_ring: int = 4096,
        last_ids: dict[str, int] | None = None,
    ) -> None:
        if recent_limit < 0:
            raise ValueError("recent_limit must be >= 0")
        if event_ring < 0:
            raise ValueError("event_ring must be >= 0")
        self._recent_limit = recent_limit
        self._event_ring = event_ring
        self._rooms: dict[str, Room] = {}
        # Sequences of rooms not held in memory: name -> (last_id, bus_seq).
        self._dormant: dict[str, tuple[int, int]] = {
            name: (last_id, 0) for name, last_id in (last_ids or {}).items()
        }

    def __contains__(self, name: object) -> bool:
        """Whether the room is currently held in memory."""
        return name in self._rooms

    def __len__(self) -> int:
        """Number of rooms held in memory."""
        return len(self._rooms)

    def room(self, name: str) -> Room:
        """The room called ``name``, created (continuing its sequences) if needed."""
        room = self._rooms.get(name)
        if room is None:
            last_id, bus_seq = self._dormant.pop(name, (0, 0))
            room = Room(
                name=name,
                last_id=last_id,
                bus_seq=bus_seq,
                recent=collections.deque(maxlen=self._recent_limit),
                events=collections.deque(maxlen=self._event_ring),
            )
            self._rooms[name] = room
        return room

    def last_id(self, name: str) -> int:
        """Last message id assigned in ``name`` (without creating the room)."""
        room = self._rooms.get(name)
        if room is not None:
            return room.last_id
        return self._dormant.get(name, (0, 0))[0]

    # -- messages -------------------------------------------------------------

    def next_message(self, room: str, user: str, content: str, now_ms: int,
                     idempotency_key: str = "") -> StoredMessage:
        """Assign the next id of ``room`` to a new message and remember it in ``recent``."""
        state = self.room(room)
        state.last_id += 1
        message = StoredMessage(
            room=room, id=state.last_id, user=user, content=content, timestamp=now_ms,
            idempotency_key=idempotency_key,
        )
        state.recent.append(message)
        member = state.members.get(user)
        if member is not None:
            member.message_count += 1
        return message

    def recent_after(self, room: str, after_id: int) -> list[StoredMessage] | None:
        """Messages with ``id > after_id`` from the ring, ascending.

        ``None`` when the ring does not reach back to ``after_id + 1`` (the
        caller reads the store instead); ``[]`` when nothing is newer.
        """
        state = self._rooms.get(room)
        if state is None:
            last_id, ring = self.last_id(room), collections.deque[StoredMessage]()
        else:
            last_id, ring = state.last_id, state.recent
        if after_id >= last_id:
            return []
        oldest = ring[0].id if ring else last_id + 1
        if after_id < 0 or after_id + 1 < oldest:
            return None
        return list(itertools.islice(ring, after_id + 1 - oldest, None))

    # -- presence -------------------------------------------------------------

    def join(self, room: str, user: str, now_ms: int) -> bool:
        """Add one stream of ``user``; True when the user was not present before."""
        state = self.room(room)
        member = state.members.get(user)
        if member is None:
            state.members[user] = Member(name=user, joined_at=now_ms, streams=1)
            return True
        member.streams += 1
        return False

    def leave(self, room: str, user: str) -> bool:
        """Remove one stream of ``user``; True when it was the user's last stream.

        Unknown rooms or users are not an error (returns False).
        """
        state = self._rooms.get(room)
        if state is None:
            return False
        member = state.members.get(user)
        if member is None:
            return False
        member.streams -= 1
        if member.streams > 0:
            return False
        del state.members[user]
        return True

    def members(self, room: str) -> list[Member]:
        """Present members of ``room``, sorted by ``joined_at`` then name."""
        state = self._rooms.get(room)
        if state is None:
            return []
        return sorted(state.members.values(), key=lambda m: (m.joined_at, m.name))

    # -- fan-out bus events -----------------------------------------------------

    def record_event(self, room: str, payload: bytes) -> int:
        """Number ``payload`` with the next bus sequence of ``room``, keep it in the ring."""
        state = self.room(room)
        state.bus_seq += 1
        state.events.append((state.bus_seq, payload))
        return state.bus_seq

    def events_after(
        self, room: str, after_seq: int, upto_seq: int | None = None
    ) -> list[tuple[int, bytes]] | None:
        """Events with ``after_seq < seq <= upto_seq`` (all newer when ``upto_seq``
        is None), in order.

        ``None`` when the ring no longer holds ``after_seq + 1`` (the stream
        must resume from history), and also when ``after_seq`` is beyond the
        current ``bus_seq`` (a sequence this table never issued, e.g. from
        before a restart).  ``upto_seq`` beyond ``bus_seq`` is capped.
        """
        state = self._rooms.get(room)
        if state is None:
            bus_seq = self._dormant.get(room, (0, 0))[1]
            ring: collections.deque[tuple[int, bytes]] = collections.deque()
        else:
            bus_seq, ring = state.bus_seq, state.events
        if after_seq < 0 or after_seq > bus_seq:
            return None
        upto = bus_seq if upto_seq is None else min(upto_seq, bus_seq)
        if upto <= after_seq:
            return []
        oldest = ring[0][0] if ring else bus_seq + 1
        if after_seq + 1 < oldest:
            return None
        return list(itertools.islice(ring, after_seq + 1 - oldest, upto + 1 - oldest))

    # -- memory -----------------------------------------------------------------

    def forget_idle(self, room: str) -> None:
        """Drop ``room`` from memory if it has no members (no-op otherwise).

        Only its ``last_id`` and ``bus_seq`` are kept, so a later
        :meth:`room` continues both sequences; the rings are discarded.
        """
        state = self._rooms.get(room)
        if state is None or state.members:
            return
        del self._rooms[room]
        if state.last_id or state.bus_seq:
            self._dormant[room] = (state.last_id, state.bus_seq)
