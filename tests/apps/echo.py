"""An echo service for broker tests: four patterns, sharded by ``key``, reporting the worker pid."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from workers.app import SimpleApp
from zrpc.context import RequestContext
from zrpc.dispatch import ServerCall
from zrpc.service import Service

svc = Service("Echo")
_cancelled: list[str] = []


@svc.unary("Say", request=dict, response=dict, shard_key="key")
async def say(request: Any, ctx: RequestContext) -> dict[str, Any]:
    return {**request, "pid": os.getpid()}


@svc.client_stream("Sum", request=dict, response=dict, shard_key="key")
async def total(call: ServerCall) -> dict[str, Any]:
    n = 0
    async for m in call:
        n += m["n"]
    return {"sum": n, "pid": os.getpid()}


@svc.server_stream("Count", request=dict, response=dict, shard_key="key")
async def count(request: Any, call: ServerCall) -> None:
    for i in range(request["n"]):
        await call.send({"i": i, "pid": os.getpid()})


@svc.bidi("Chat", request=dict, response=dict, shard_key="key")
async def chat(call: ServerCall) -> None:
    async for m in call:
        await call.send({**m, "pid": os.getpid()})


@svc.unary("Sleep", request=dict, response=dict, shard_key="key")
async def sleep(request: Any, ctx: RequestContext) -> dict[str, Any]:
    try:
        await asyncio.sleep(request["seconds"])  # the handler's work, cancellable
    except asyncio.CancelledError:
        _cancelled.append(request.get("tag", ""))
        raise
    return {"slept": request["seconds"]}


@svc.unary("Cancelled", request=dict, response=dict, shard_key="key")
async def cancelled(request: Any, ctx: RequestContext) -> dict[str, Any]:
    return {"tags": list(_cancelled)}




# ---------------------------------------------------------------- fan-out
class _Topics:
    """Per-topic sequence numbers and a ring of recent events (for gap repair)."""

    def __init__(self) -> None:
        self.seq: dict[str, int] = {}
        self.ring: dict[str, list[tuple[int, bytes]]] = {}
        self.active: dict[str, int] = {}


_topics = _Topics()


@svc.server_stream("Listen", request=dict, response=dict, shard_key="key")
async def listen(request: Any, call: ServerCall) -> None:
    call.attach(request["key"], _topics.seq.get(request["key"], 0))
    await call.send({"attached": True})
    await call.wait_closed()


@svc.unary("Publish", request=dict, response=dict, shard_key="key")
async def publish(request: Any, ctx: RequestContext) -> dict[str, Any]:
    import msgpack

    topic = request["key"]
    first = _topics.seq.get(topic, 0) + 1
    for i in range(request.get("count", 1)):
        seq = _topics.seq[topic] = first + i
        payload = msgpack.packb({"seq": seq, "body": request.get("body", "")})
        ring = _topics.ring.setdefault(topic, [])
        ring.append((seq, payload))
        del ring[:-10_000]
        _topics.active[topic] = seq
        if ctx.bus is not None and seq not in request.get("drop", ()):  # "drop": simulate bus loss
            ctx.bus.publish(topic, seq, payload)
    return {"last": _topics.seq[topic]}


class EchoApp(SimpleApp):
    def replay(self, topic: str, after_seq: int, upto_seq: int | None) -> list[tuple[int, bytes]] | None:
        ring = _topics.ring.get(topic, [])
        if not ring or ring[0][0] > after_seq + 1:
            return None
        return [(s, p) for s, p in ring if s > after_seq and (upto_seq is None or s <= upto_seq)]

    def drain_activity(self) -> dict[str, int]:
        active = dict(_topics.active)
        _topics.active.clear()
        return active




def app(worker: Any) -> EchoApp:
    return EchoApp(svc)
