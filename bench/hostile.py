"""Hostile-client load against a running broker: ``kind: "hostile"`` of :mod:`bench.load`.

Three attacks, each measured on the broker process (VmRSS sampled every
50 ms) while two well-behaved clients keep working and time themselves:

* ``storm``: ``storm_conns`` TLS connections each open ``storm_streams``
  ``Chat/SubscribeToRoom`` streams in one room, every stream under its own
  user name, and never read (the socket is paused);
* ``flood``: one subscriber announces 2^31-1 windows, never reads and PINGs
  every 5 s (so keepalive keeps it), while ``flood_events`` events of
  ``flood_size`` bytes are published to its room;
* ``churn``: rounds of 200 connections that connect, HELLO, call
  Health/Check and close (``normal``), or connect, HELLO and send 64 KiB of
  garbage (``garbage``).

The bystander is a subscriber in another room that receives a message every
50 ms carrying its send time (latency = arrival - send); the prober opens a
new connection every 250 ms and calls Health/Check (latency of connect +
call). Every attack reports broker peak RSS, RSS 10 s after the attacker
left, the bystander's p50/p99/max and the prober's p50/max/failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from typing import Any

import msgpack

from bench.common import rss_kib
from zrpc.address import parse_address
from zrpc.protocol.frames import FrameFlag, FrameType, encode_frame

__all__ = ["run_hostile"]

F = FrameType
_END = int(FrameFlag.END_STREAM)
MiB = 1024 * 1024
HELLO = {"version": 1, "max_message_size": 4 * MiB, "max_concurrent_streams": 1024,
         "initial_stream_window": 256 * 1024, "initial_connection_window": 4 * MiB,
         "max_metadata_size": 16384, "user_agent": "bench-hostile"}


def _frame(ftype: int, sid: int, body: Any, flags: int = 0) -> bytes:
    payload = body if isinstance(body, bytes) else msgpack.packb(body)
    return encode_frame(ftype, flags, sid, payload)


def _hello(**changes: Any) -> bytes:
    return _frame(F.HELLO, 0, {**HELLO, **changes})


def _subscribe(sid: int, room: str, user: str) -> bytes:
    return (_frame(F.OPEN, sid, ["Chat/SubscribeToRoom", None, {}])
            + _frame(F.MESSAGE, sid, {"room": room, "user": user}, _END))


class _Sink(asyncio.Protocol):
    """A raw connection that never reads once told to (the socket is paused)."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class Monitor:
    """Broker RSS sampler, bystander subscriber and Health/Check prober."""

    def __init__(self, address: str, pid: int, tls: Any) -> None:
        self.address = address
        self.pid = pid
        self.tls = tls
        self.rss: list[tuple[float, int]] = []
        self.lat: list[float] = []
        self.probes: list[float] = []
        self.probe_failures = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        import zrpc
        from zrpc.chat import ChatResponse, SubscribeRequest

        self.sub_client = zrpc.Client(zrpc.ClientConfig(request_timeout_ms=60_000))
        await self.sub_client.connect(self.address, self.tls)
        self.pub_client = zrpc.Client(zrpc.ClientConfig(request_timeout_ms=60_000))
        await self.pub_client.connect(self.address, self.tls)
        stream = await self.sub_client.server_stream(
            "Chat/SubscribeToRoom", SubscribeRequest(room="bystander", user="bystander"), ChatResponse)
        await stream.next()  # its own user_joined: attached
        self._tasks = [asyncio.create_task(c) for c in
                       (self._sample(), self._read(stream), self._publish(), self._probe())]

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in (self.sub_client, self.pub_client):
            with contextlib.suppress(Exception):
                await c.close()

    def mark(self) -> tuple[int, int, int]:
        return len(self.rss), len(self.lat), len(self.probes)

    async def _sample(self) -> None:
        while True:
            self.rss.append((time.monotonic(), rss_kib(self.pid)))
            await asyncio.sleep(0.05)

    async def _read(self, stream: Any) -> None:
        async for ev in stream:
            if ev.message is not None and ev.message.content.startswith("t="):
                self.lat.append(time.monotonic_ns() / 1e9 - int(ev.message.content[2:]) / 1e9)

    async def _publish(self) -> None:
        from zrpc.chat import ChatResponse, Message

        while True:
            with contextlib.suppress(Exception):
                await self.pub_client.unary("Chat/SendMessage", Message(
                    user="clock", room="bystander", content=f"t={time.monotonic_ns()}"), ChatResponse,
                    timeout=30)
            await asyncio.sleep(0.05)

    async def _probe(self) -> None:
        import zrpc

        while True:
            t0 = time.monotonic()
            try:
                c = zrpc.Client(zrpc.ClientConfig(connect_timeout_ms=30_000))
                await c.connect(self.address, self.tls)
                await c.unary("Health/Check", {}, dict, timeout=30)
                await c.close()
                self.probes.append(time.monotonic() - t0)
            except Exception:
                self.probe_failures += 1
            await asyncio.sleep(0.25)

    def report(self, since: tuple[int, int, int], baseline_kib: int, after_kib: int) -> dict[str, Any]:
        rss = [kib for _, kib in self.rss[since[0]:]]
        lat = sorted(self.lat[since[1]:])
        probes = sorted(self.probes[since[2]:])

        def q(xs: list[float], f: float) -> float | None:
            return round(xs[min(len(xs) - 1, int(f * len(xs)))] * 1e3, 1) if xs else None

        return {"baseline_mib": round(baseline_kib / 1024, 1),
                "peak_mib": round(max(rss, default=0) / 1024, 1),
                "after_10s_mib": round(after_kib / 1024, 1),
                "bystander_ms": {"p50": q(lat, .5), "p99": q(lat, .99),
                                 "max": round(lat[-1] * 1e3, 1) if lat else None, "n": len(lat)},
                "health_ms": {"p50": q(probes, .5), "max": round(probes[-1] * 1e3, 1) if probes else None,
                              "n": len(probes), "failures": self.probe_failures}}


async def _open_raw(address: str, ctx: ssl.SSLContext) -> _Sink:
    a = parse_address(address)
    _, proto = await asyncio.get_running_loop().create_connection(_Sink, a.host, a.port, ssl=ctx,
                                                                   server_hostname="localhost")
    return proto


async def storm(address: str, ctx: ssl.SSLContext, conns: int, streams: int) -> list[_Sink]:
    sinks = []
    for c in range(conns):
        s = await _open_raw(address, ctx)
        s.transport.pause_reading()
        s.transport.write(_hello(initial_stream_window=2**31 - 1, initial_connection_window=2**31 - 1))
        s.transport.write(b"".join(_subscribe(2 * k + 1, "storm", f"user-{c}-{k}") for k in range(streams)))
        sinks.append(s)
    return sinks


async def flood(address: str, ctx: ssl.SSLContext, tls: Any, events: int, size: int) -> _Sink:
    import zrpc
    from zrpc.chat import BatchSummary, Message

    s = await _open_raw(address, ctx)
    s.transport.write(_hello(initial_stream_window=2**31 - 1, initial_connection_window=2**31 - 1))
    s.transport.write(_subscribe(1, "flood", "hungry"))
    s.transport.pause_reading()

    async def ping() -> None:
        while not s.lost.done():
            s.transport.write(_frame(F.PING, 0, b"12345678"))
            await asyncio.sleep(5)

    pinger = asyncio.create_task(ping())
    s.pinger = pinger  # type: ignore[attr-defined]
    pub = zrpc.Client(zrpc.ClientConfig(request_timeout_ms=300_000))
    await pub.connect(address, tls)
    body = "x" * size
    batch = await pub.client_stream("Chat/SendMessageBatch", Message, BatchSummary, timeout=300)
    for _ in range(events):
        await batch.send(Message(user="flooder", room="flood", content=body))
    await batch.close_and_receive()
    await pub.close()
    return s


async def churn_round(address: str, ctx: ssl.SSLContext, n: int, garbage: bool, parallel: int = 20) -> int:
    """``n`` connections that HELLO then call Health/Check (or send 64 KiB of garbage) and close."""
    failures = 0
    sem = asyncio.Semaphore(parallel)
    junk = os.urandom(64 * 1024)

    async def one() -> None:
        nonlocal failures
        async with sem:
            a = parse_address(address)
            try:
                reader, writer = await asyncio.open_connection(a.host, a.port, ssl=ctx,
                                                               server_hostname="localhost")
                writer.write(_hello())
                if garbage:
                    writer.write(junk)
                else:
                    writer.write(_frame(F.OPEN, 1, ["Health/Check", 10_000, {}]) + _frame(F.MESSAGE, 1, {}, _END))
                await writer.drain()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.read(65536), 10)
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 5)
            except OSError:
                failures += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return failures


async def _close(sinks: list[_Sink]) -> None:
    for s in sinks:
        pinger = getattr(s, "pinger", None)
        if pinger is not None:
            pinger.cancel()
        s.transport.abort()
    await asyncio.sleep(0)


async def _settled(pid: int, seconds: float) -> int:
    await asyncio.sleep(seconds)  # the goal is "RSS 10 s after the attacker left": a wall-clock wait
    return rss_kib(pid)


async def run_hostile(spec: dict[str, Any]) -> dict[str, Any]:
    import zrpc

    address, pid = spec["address"], int(spec["rss_pid"])
    tls = zrpc.TlsConfig.development()
    ctx = tls.client_context()
    settle = float(spec.get("settle_s", 10.0))
    only = set(spec.get("attacks", ["storm", "flood", "churn"]))
    mon = Monitor(address, pid, tls)
    await mon.start()
    await asyncio.sleep(1.0)  # a baseline with the monitor running
    out: dict[str, Any] = {}
    if "storm" in only:
        base, since = rss_kib(pid), mon.mark()
        t0 = time.monotonic()
        sinks = await storm(address, ctx, int(spec.get("storm_conns", 3)), int(spec.get("storm_streams", 1000)))
        await asyncio.sleep(float(spec.get("storm_hold_s", 10.0)))
        await _close(sinks)
        out["storm"] = mon.report(since, base, await _settled(pid, settle))
        out["storm"]["wall_s"] = round(time.monotonic() - t0, 1)
    if "flood" in only:
        base, since = rss_kib(pid), mon.mark()
        t0 = time.monotonic()
        sink = await flood(address, ctx, tls, int(spec.get("flood_events", 20_000)),
                           int(spec.get("flood_size", 4096)))
        await asyncio.sleep(2.0)
        await _close([sink])
        out["flood"] = mon.report(since, base, await _settled(pid, settle))
        out["flood"]["wall_s"] = round(time.monotonic() - t0, 1)
    if "churn" in only:
        res: dict[str, Any] = {}
        for kind in ("normal", "garbage"):
            rounds = int(spec.get("churn_rounds", 7))
            series, failures = [], 0
            for _ in range(rounds):
                failures += await churn_round(address, ctx, 200, kind == "garbage")
                await asyncio.sleep(1.5)  # past the broker's next heartbeat (it trims then)
                series.append(round(rss_kib(pid) / 1024, 1))
            res[kind] = {"rss_mib_after_each_round": series, "failures": failures,
                         "growth_after_first_mib": round(series[-1] - series[0], 1),
                         "connections_after_first": 200 * (rounds - 1)}
        out["churn"] = res
    await mon.stop()
    out["rss_series"] = [(round(t, 2), kib) for t, kib in mon.rss[::10]]
    return out

