"""The grpc.aio peer: the same methods and payloads as the zrpc side, msgpack on the wire.

Written the way a grpc.aio user would without protobuf: generic method
handlers with msgpack (de)serializers, async handlers and async-generator
streams, one ``asyncio.Queue`` per fan-out subscriber. TLS with the same
development certificate as zrpc.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import msgpack

from bench.common import stream_message

_ser = msgpack.packb


def _de(data: bytes) -> Any:
    return msgpack.unpackb(data)


SERVER_OPTIONS = [
    ("grpc.max_concurrent_streams", 2048),
    ("grpc.so_reuseport", 0),
]


class FanOut:
    """topic -> subscriber queues; one sequence number per topic."""

    def __init__(self, max_queued: int = 4096) -> None:
        self.topics: dict[str, set[asyncio.Queue[Any]]] = {}
        self.seq: dict[str, int] = {}
        self.max_queued = max_queued

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        subs = self.topics.get(topic)
        if not subs:
            return
        for q in list(subs):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:  # a slow subscriber: end its stream, as zrpc does
                subs.discard(q)
                q._queue.clear()  # type: ignore[attr-defined]
                q.put_nowait(None)


def build_server(fanout: FanOut) -> grpc.aio.Server:
    pid = os.getpid()

    async def say(request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        return {**request, "pid": pid}

    async def chat(requests: AsyncIterator[dict[str, Any]],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[dict[str, Any]]:
        async for m in requests:
            yield {**m, "pid": pid}

    async def stream(request: dict[str, Any],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[dict[str, Any]]:
        for i in range(int(request["n"])):
            yield stream_message(i)

    async def listen(request: dict[str, Any],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[dict[str, Any]]:
        q: asyncio.Queue[Any] = asyncio.Queue(fanout.max_queued)
        subs = fanout.topics.setdefault(request["key"], set())
        subs.add(q)
        try:
            yield {"attached": True}
            while True:
                event = await q.get()
                if event is None:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "subscriber too slow")
                yield event
        finally:
            subs.discard(q)

    async def publish(request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        topic = request["key"]
        body = request.get("body", "")
        first = fanout.seq.get(topic, 0) + 1
        count = int(request.get("count", 1))
        for seq in range(first, first + count):
            fanout.publish(topic, {"seq": seq, "body": body})
        fanout.seq[topic] = first + count - 1
        return {"last": first + count - 1}

    echo = grpc.method_handlers_generic_handler("Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say, _de, _ser),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, _de, _ser),
        "Listen": grpc.unary_stream_rpc_method_handler(listen, _de, _ser),
        "Publish": grpc.unary_unary_rpc_method_handler(publish, _de, _ser),
    })
    bench = grpc.method_handlers_generic_handler("Bench", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream, _de, _ser),
    })
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((echo, bench))
    return server


def server_credentials(tls_dir: Path) -> grpc.ServerCredentials:
    key = (tls_dir / "dev-server.key").read_bytes()
    cert = (tls_dir / "dev-server.crt").read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])


def channel(address: str, tls_dir: Path, separate: bool = True) -> grpc.aio.Channel:
    """A TLS channel; ``separate`` gives it its own TCP connection (no shared subchannel)."""
    creds = grpc.ssl_channel_credentials(root_certificates=(tls_dir / "dev-ca.crt").read_bytes())
    options: list[tuple[str, Any]] = [("grpc.ssl_target_name_override", "localhost")]
    if separate:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.aio.secure_channel(address, creds, options=options)


class Stubs:
    """Multi-callables on one channel."""

    def __init__(self, ch: grpc.aio.Channel) -> None:
        self.say = ch.unary_unary("/Echo/Say", request_serializer=_ser, response_deserializer=_de)
        self.chat = ch.stream_stream("/Echo/Chat", request_serializer=_ser, response_deserializer=_de)
        self.stream = ch.unary_stream("/Bench/Stream", request_serializer=_ser, response_deserializer=_de)
        self.listen = ch.unary_stream("/Echo/Listen", request_serializer=_ser, response_deserializer=_de)
        self.publish = ch.unary_unary("/Echo/Publish", request_serializer=_ser, response_deserializer=_de)
