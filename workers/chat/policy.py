"""The chat's authorisation policy: the token's ``rooms`` claim.

The optional ``rooms`` claim (verified by :class:`zrpc.auth.JwtAuthenticator`
to be a list of strings; ``zrpc token create --room`` writes it) lists the
rooms, by name or :mod:`fnmatch` glob such as ``"team-*"``, that the holder may
touch; without it, every room. :func:`authorize_room` raises
PERMISSION_DENIED.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

from zrpc.status import RpcError, Status

if TYPE_CHECKING:
    from zrpc.context import RequestContext

__all__ = ["authorize_room", "room_allowed"]


def room_allowed(claims: dict[str, Any], room: str) -> bool:
    """Whether the ``rooms`` claim (names or fnmatch globs; absent = all rooms) allows ``room``."""
    rooms = claims.get("rooms") if claims else None
    if rooms is None:
        return True
    if not isinstance(rooms, list):
        return False
    return any(isinstance(p, str) and (p == room or fnmatch.fnmatchcase(room, p)) for p in rooms)


def authorize_room(context: RequestContext, room: str) -> None:
    """Raise PERMISSION_DENIED unless the caller's claims allow ``room``."""
    if not room_allowed(context.claims, room):
        who = context.identity or "this caller"
        raise RpcError(Status.PERMISSION_DENIED,
                       f"{who} may not use room {room!r} (not in the token's rooms claim)")
