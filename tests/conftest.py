"""Shared fixtures: an isolated zrpc home, a small echo service, a PostgreSQL server."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pgserver import PostgresServer, require_postgres

import zrpc


@pytest.fixture(autouse=True)
def _isolated_zrpc_home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Development TLS material (CA, server cert) goes to a per-test dir, never the real home."""
    home = tmp_path / "zrpc-home"
    monkeypatch.setenv("ZRPC_HOME", str(home))
    return home


def make_echo_service(name: str = "Echo") -> zrpc.Service:
    """The four call patterns over plain (dict) messages.

    ``Say`` echoes one map; ``Collect`` answers ``{"items": [...]}`` with every map
    received; ``Repeat`` streams ``{"i": k}`` for k in range(request["n"]); ``Chat``
    echoes each map as it arrives.
    """
    svc = zrpc.Service(name)

    @svc.unary("Say", request=dict, response=dict)
    async def say(request: Any, ctx: zrpc.RequestContext) -> Any:
        return request

    @svc.client_stream("Collect", request=dict, response=dict)
    async def collect(call: zrpc.ServerCall) -> Any:
        return {"items": [m async for m in call]}

    @svc.server_stream("Repeat", request=dict, response=dict)
    async def repeat(request: Any, call: zrpc.ServerCall) -> None:
        for k in range(request["n"]):
            await call.send({"i": k})

    @svc.bidi("Chat", request=dict, response=dict)
    async def chat(call: zrpc.ServerCall) -> None:
        async for m in call:
            await call.send(m)

    return svc


@pytest.fixture
def echo_service() -> Callable[..., zrpc.Service]:
    """A factory: ``echo_service(name="Echo")`` -> a fresh :class:`zrpc.Service`."""
    return make_echo_service


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (tests/pgserver.py, a temp dir), always stopped.

    Skips when the server binaries are missing; fails instead under CI=true.
    """
    bindir = require_postgres()
    server = PostgresServer(bindir)
    try:
        yield server.start()
    finally:
        server.stop()
