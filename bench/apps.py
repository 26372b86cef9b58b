"""zrpc services for the benchmarks.

``Echo/*`` is ``tests.apps.echo`` unchanged. ``Bench/Stream`` (server
streaming ``{key, n}`` -> ``n`` messages of 64 bytes) exists because
``Echo/Count`` sends ~18-byte messages and scenario 2 asks for 64.

``app`` is a worker app (``zrpc-broker start --app bench.apps:app``): the echo
app plus ``Bench/Stream``. ``services()`` is what the in-process server adds.
"""

from __future__ import annotations

from typing import Any

from bench.common import stream_message
from tests.apps.echo import EchoApp
from tests.apps.echo import svc as echo_svc
from zrpc.dispatch import ServerCall
from zrpc.service import Service

stream_svc = Service("Bench")


@stream_svc.server_stream("Stream", request=dict, response=dict, shard_key="key")
async def stream(request: Any, call: ServerCall) -> None:
    for i in range(int(request["n"])):
        await call.send(stream_message(i))


def services() -> list[Service]:
    return [echo_svc, stream_svc]


def app(worker: Any) -> EchoApp:
    return EchoApp(echo_svc, stream_svc)
