"""The broker <-> worker wire (internal to a zrpc deployment).

Workers connect a DEALER to each broker's ROUTER (READY first, then
heartbeats both ways, Paranoid-Pirate style) and bind a PUB socket for room
events. Every ZeroMQ message starts with a one-frame command:

worker -> broker (the ROUTER prepends the worker's identity)
  READY  [msgpack info]        register: version, shard, shards, pid, methods, settings, bus
  HB     [msgpack tails]       heartbeat; tails = {topic: last seq published since the last HB}
  F      cid  frames           zrpc frames of virtual connection ``cid`` (server side)
  A      cid  [msgpack]        attach: [stream id, topic, after_seq]
  R      [msgpack]             repair answer: [topic, [[seq, payload], ...] | None]
  C      frames                zrpc frames of the worker's own client connection to the broker
  GONE   cid                   frames arrived for a connection whose session this worker no longer
                               has (it dropped it): fail that connection's calls, open it afresh
  BYE                          clean exit

broker -> worker
  HB                           heartbeat
  F      cid  frames           zrpc frames of virtual connection ``cid`` (client side)
  X      cid                   the client connection ``cid`` is gone: cancel its calls
  G      [msgpack]             repair request: [topic, after_seq, upto_seq | None]
  C      frames                frames for the worker's own client connection
  NO     [msgpack refusal]     registration refused / unknown worker: {"reason": str, "fatal": bool};
                               fatal: a misconfiguration that cannot heal, the worker exits

bus (PUB -> SUB):  [topic + b"\\0", seq (u64 big-endian), payload]
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack

__all__ = [
    "ATTACH",
    "BYE",
    "CLIENT",
    "CLUSTER_VERSION",
    "DISCONNECT",
    "FRAMES",
    "GAP",
    "GONE",
    "HEARTBEAT",
    "READY",
    "REFUSED",
    "REPAIR",
    "SEQ",
    "refusal",
    "refused",
    "topic_frame",
    "trust_principal",
]

CLUSTER_VERSION: Final = 1
READY: Final = b"READY"
HEARTBEAT: Final = b"HB"
FRAMES: Final = b"F"
ATTACH: Final = b"A"
REPAIR: Final = b"R"
CLIENT: Final = b"C"
BYE: Final = b"BYE"
DISCONNECT: Final = b"X"
GAP: Final = b"G"
REFUSED: Final = b"NO"
GONE: Final = b"GONE"
SEQ: Final = struct.Struct("!Q")


def topic_frame(topic: str) -> bytes:
    """Topics are delimited because ZeroMQ subscriptions match prefixes."""
    return topic.encode("utf-8", "surrogatepass") + b"\0"


def trust_principal(hello: dict[str, Any], peer: Any) -> tuple[str | None, dict[str, Any]]:
    """The workers' authenticator: a virtual connection's HELLO names the principal and
    claims the broker authenticated (the broker is trusted; clients never reach a worker)."""
    principal = hello.get("principal")
    claims = hello.get("claims")
    return (principal if isinstance(principal, str) else None,
            claims if isinstance(claims, dict) else {})


def refused(reason: str, *, fatal: bool) -> bytes:
    """The body of NO: why, and whether the worker should give up (exit) rather than retry."""
    return msgpack.packb({"reason": reason, "fatal": fatal})


def refusal(body: bytes | None) -> tuple[str, bool]:
    """Parse a NO body (older brokers send a bare reason string); never raises."""
    try:
        value = msgpack.unpackb(body) if body is not None else None
    except Exception:
        return "unreadable refusal", False
    if isinstance(value, dict):
        return str(value.get("reason", "?")), bool(value.get("fatal"))
    return str(value) if value is not None else "?", False
