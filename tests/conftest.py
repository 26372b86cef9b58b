"""Shared fixtures: an isolated zrpc home, a small echo service, a PostgreSQL server."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop
from pgserver import PostgresServer, require_postgres

import zrpc


@pytest.fixture(autouse=True)
def _isolated_zrpc_home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Development TLS material (CA, server cert) goes to a per-test dir, never the real home."""
    home = tmp_path / "zrpc-home"
    monkeypatch.setenv("ZRPC_HOME", str(home))
    return home


#: Seconds a test's event loop stops before pytest-timeout would: pytest-timeout's
#: thread method (the only one that interrupts a blocked uvloop) ends the whole run.
_LOOP_MARGIN_S = 5.0


@pytest.fixture(autouse=True)
def _bounded_event_loops(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``uvloop.run`` in a test ends before the test's timeout with the awaiting line's traceback.

    A hung await then fails that one test (the cancelled coroutine's stack shows
    where it waited) instead of pytest-timeout stopping the whole session.
    """
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker is not None and marker.args else float(
        request.config.getini("timeout") or 60)
    deadline = time.monotonic() + max(1.0, limit - _LOOP_MARGIN_S)
    real_run = uvloop.run

    def bounded_run(main: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        async def until_deadline() -> Any:
            budget = max(0.1, deadline - time.monotonic())
            try:
                return await asyncio.wait_for(main, budget)
            except TimeoutError as exc:
                raise AssertionError(f"the test's event loop was still waiting after {budget:.1f}s "
                                     "(see the cancelled await in the traceback above)") from exc
        return real_run(until_deadline(), **kwargs)

    monkeypatch.setattr(uvloop, "run", bounded_run)


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
