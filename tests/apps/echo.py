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


def app(worker: Any) -> SimpleApp:
    return SimpleApp(svc)
