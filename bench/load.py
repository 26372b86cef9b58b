"""Load generators, one per process: ``python -m bench.load '<json spec>'``.

The spec's ``kind`` picks the workload, ``target`` the peer (``zrpc``,
``grpc``, ``bare``); grpc.aio clients run on asyncio's default loop unless
``loop`` is ``uvloop`` (everything else always runs on uvloop). Every workload is bounded in time (warm-up then a
measured window) and in count (``max_ops``); the process prints one
``BENCH-RESULT {json}`` line. CPU seconds of the server process trees
(``server_pids``, children included) and of the load processes (this one
plus ``load_pids``) are read from /proc over the measured window only.

Latency: unary and ping-pong, call start to response; server streaming,
the gap between consecutive messages on one stream; fan-out, the send
timestamp embedded in the event body to its arrival (CLOCK_MONOTONIC is
system-wide, so it compares across processes).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from bench.common import (
    BODY_100,
    Background,
    CpuMeter,
    emit_result,
    fanout_body,
    now,
    parse_fanout_body,
    raise_nofile,
    rss_kib,
    summarize,
    unary_request,
)
from bench.hostile import run_hostile

#: Fan-out latency histogram: 400 log-spaced bins from 1 us to 100 s (4.7 % wide).
HIST_LO, HIST_HI, HIST_BINS = 1e-6, 100.0, 400
STREAM_CHUNK = 10_000  # messages asked for per server-streaming call


def tls_dir() -> Path:
    from zrpc.tls import ensure_development_ca

    return ensure_development_ca().server_cert.parent


class Window:
    """Warm-up, then a measured window: CPU meters and the ``measuring`` flag."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.warmup = float(spec.get("warmup", 0.5))
        self.duration = float(spec.get("duration", 2.0))
        self.server = CpuMeter(spec.get("server_pids", []))
        self.load = CpuMeter([os.getpid(), *spec.get("load_pids", [])], tree=False)
        self.background = Background()
        self.measuring = False
        self.stopping = False
        self.t0 = self.t1 = 0.0

    def begin(self) -> None:
        self.server.start()
        self.load.start()
        self.background.start()
        self.t0 = now()
        self.measuring = True

    def end(self) -> None:
        self.measuring = False
        self.t1 = now()
        self.server.stop()
        self.load.stop()
        self.background.stop()

    @property
    def elapsed(self) -> float:
        return self.t1 - self.t0

    def result(self, ops: int, latencies: Any, unit: str, **extra: Any) -> dict[str, Any]:
        el = self.elapsed
        return {"ops": ops, "elapsed_s": round(el, 4), "throughput": round(ops / el, 1) if el else 0.0,
                "unit": unit, "latency_ms": summarize(latencies),
                "server_cpu_s": self.server.total, "load_cpu_s": self.load.total,
                "server_cpu_by_pid": {str(k): round(v, 3) for k, v in self.server.used.items()},
                "background_cores": self.background.cores(self.server.total + self.load.total),
                **extra}

    async def run(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Let ``tasks`` run through warm-up and the window, then stop and reap them (bounded)."""
        await asyncio.sleep(self.warmup)
        self.begin()
        await asyncio.sleep(self.duration)
        self.end()
        self.stopping = True
        done, pending = await asyncio.wait(tasks, timeout=5.0)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]


# ===================================================================== clients
async def zrpc_client(address: str) -> Any:
    import zrpc

    client = zrpc.Client(zrpc.ClientConfig(request_timeout_ms=60_000))
    await client.connect(address, _zrpc_tls())
    return client


_TLS: Any = None


def _zrpc_tls() -> Any:
    global _TLS
    if _TLS is None:
        import zrpc

        _TLS = zrpc.TlsConfig.development()
    return _TLS


class BareClient(asyncio.Protocol):
    """Pipelined echo over a bare TLS connection: ``depth`` 100-byte messages in flight."""

    def __init__(self, win: Window, depth: int, max_ops: int) -> None:
        self.win = win
        self.depth = depth
        self.max_ops = max_ops
        self.sent: collections.deque[float] = collections.deque()
        self.buffered = 0
        self.ops = 0
        self.lat = array("d")
        self.transport: Any = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.msg = BODY_100.encode()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        t = now()
        self.sent.extend([t] * self.depth)
        transport.write(b"E" + self.msg * self.depth)

    def data_received(self, data: bytes) -> None:
        self.buffered += len(data)
        k = self.buffered // 100
        if not k:
            return
        self.buffered -= k * 100
        t = now()
        win = self.win
        sent = self.sent
        for _ in range(k):
            t0 = sent.popleft()
            if win.measuring:
                self.ops += 1
                self.lat.append(t - t0)
        if win.stopping or self.ops >= self.max_ops:
            if not sent and not self.done.done():
                self.done.set_result(None)
            return
        sent.extend([t] * k)
        self.transport.write(self.msg * k)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class BareStreamClient(asyncio.Protocol):
    """Counts 64-byte records streamed by the bare server."""

    def __init__(self, win: Window) -> None:
        self.win = win
        self.bytes = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(b"S" + (10**12).to_bytes(8, "big"))

    def data_received(self, data: bytes) -> None:
        if self.win.measuring:
            self.bytes += len(data)


async def bare_connect(address: str, factory: Callable[[], asyncio.Protocol]) -> tuple[Any, Any]:
    host, port = address.rsplit(":", 1)
    ctx = _zrpc_tls().client_context()
    loop = asyncio.get_running_loop()
    return await loop.create_connection(factory, host, int(port), ssl=ctx, server_hostname="localhost")


# ======================================================================= unary
async def run_unary(spec: dict[str, Any]) -> dict[str, Any]:
    target, address, conc = spec["target"], spec["address"], int(spec["concurrency"])
    method = spec.get("method", "Echo/Say")
    max_ops = int(spec.get("max_ops", 5_000_000))
    win = Window(spec)
    lat = array("d")
    ops = 0

    if target == "bare":
        proto = BareClient(win, conc, max_ops)
        transport, _ = await bare_connect(address, lambda: proto)
        await asyncio.sleep(win.warmup)
        win.begin()
        await asyncio.sleep(win.duration)
        win.end()
        win.stopping = True
        try:
            await asyncio.wait_for(proto.done, 5)
        except TimeoutError:
            pass
        transport.close()
        return win.result(proto.ops, proto.lat, "calls/s", concurrency=conc)

    call: Callable[[int], Awaitable[Any]]
    closer: Callable[[], Awaitable[Any]]
    nconn = max(1, int(spec.get("connections", 1)))
    if target == "zrpc":
        clients = [await zrpc_client(address) for _ in range(nconn)]
        if method == "Chat/SendMessage":
            from zrpc.chat import ChatResponse, Message

            rooms = int(spec.get("rooms", 64))
            keyed = bool(spec.get("keyed"))  # an idempotency key per message (dedupe index)
            run_id = os.urandom(6).hex()

            async def call(i: int) -> Any:
                key = f"{run_id}-{i}" if keyed else ""
                r = await clients[i % nconn].unary("Chat/SendMessage",
                                       Message(user=f"user{i % 1000}", content=BODY_100,
                                               room=f"room-{i % rooms}", idempotency_key=key),
                                       ChatResponse)
                if r.type != "ack":
                    raise RuntimeError(f"not acked: {r}")
        else:
            async def call(i: int) -> Any:
                return await clients[i % nconn].unary(method, unary_request(i), dict)

        async def closer() -> None:
            for c in clients:
                await c.close()
    elif target == "grpc":
        from bench import grpc_peer

        chans = [grpc_peer.channel(address, tls_dir()) for _ in range(nconn)]
        for ch in chans:
            await ch.channel_ready()
        says = [grpc_peer.Stubs(ch).say for ch in chans]

        async def call(i: int) -> Any:
            return await says[i % nconn](unary_request(i))

        async def closer() -> None:
            for ch in chans:
                await ch.close()
    else:
        raise ValueError(target)

    async def worker(w: int) -> None:
        nonlocal ops
        i = w
        while not win.stopping and ops < max_ops:
            t0 = now()
            await call(i)
            if win.measuring:
                lat.append(now() - t0)
                ops += 1
            i += conc

    tasks = [asyncio.create_task(worker(w)) for w in range(conc)]
    await win.run(tasks)
    await closer()
    return win.result(ops, lat, "calls/s", concurrency=conc, connections=nconn)


# ============================================================= server stream
async def run_stream(spec: dict[str, Any]) -> dict[str, Any]:
    target, address, streams = spec["target"], spec["address"], int(spec["streams"])
    max_ops = int(spec.get("max_ops", 200_000_000))
    win = Window(spec)
    lat = array("d")
    ops = 0
    seen = [0]  # messages received at all (warm-up included): time to first message
    per_stream = [0] * streams  # messages per stream in the window: fairness

    if target == "bare":
        proto = BareStreamClient(win)
        transport, _ = await bare_connect(address, lambda: proto)
        await asyncio.sleep(win.warmup)
        win.begin()
        await asyncio.sleep(win.duration)
        win.end()
        transport.abort()
        return win.result(proto.bytes // 64, [], "msgs/s", streams=1)

    async def consume(messages: Any, w: int) -> bool:
        """Count one stream's messages; False once the window is over or the cap reached."""
        nonlocal ops
        last = now()
        async for _m in messages:
            t = now()
            seen[0] += 1
            if win.measuring:
                ops += 1
                per_stream[w] += 1
                lat.append(t - last)
            last = t
            if win.stopping or ops >= max_ops:
                return False
        return True

    if target == "zrpc":
        client = await zrpc_client(address)

        async def one_call(k: str, w: int) -> bool:
            stream = await client.server_stream("Bench/Stream", {"key": k, "n": STREAM_CHUNK}, dict)
            try:
                return await consume(stream, w)
            finally:
                await stream.close()
        closer = client.close
    elif target == "grpc":
        from bench import grpc_peer

        ch = grpc_peer.channel(address, tls_dir())
        await ch.channel_ready()
        stubs = grpc_peer.Stubs(ch)

        async def one_call(k: str, w: int) -> bool:
            call = stubs.stream({"key": k, "n": STREAM_CHUNK})
            try:
                return await consume(call, w)
            finally:
                call.cancel()
        closer = ch.close
    else:
        raise ValueError(target)

    t_start = now()
    first: list[float] = []

    async def worker(w: int) -> None:
        while not win.stopping and await one_call(f"k{w}", w):
            pass

    async def watch_first() -> None:
        while not win.stopping and not seen[0]:
            await asyncio.sleep(0.005)
        first.append(now() - t_start)

    tasks = [asyncio.create_task(worker(w)) for w in range(streams)]
    watcher = asyncio.create_task(watch_first())
    await win.run(tasks)
    watcher.cancel()
    await closer()
    ranked = sorted(per_stream)
    return win.result(ops, lat, "msgs/s", streams=streams,
                      first_message_s=round(first[0], 3) if first else None,
                      per_stream_msgs={"min": ranked[0], "median": ranked[len(ranked) // 2],
                                       "max": ranked[-1],
                                       "starved": sum(1 for n in ranked if n < 0.1 * ops / streams)})


# ================================================================= ping-pong
async def run_pingpong(spec: dict[str, Any]) -> dict[str, Any]:
    target, address = spec["target"], spec["address"]
    if target == "bare":
        return {**await run_unary({**spec, "concurrency": 1}), "unit": "round trips/s"}
    win = Window(spec)
    lat = array("d")
    ops = 0
    max_ops = int(spec.get("max_ops", 5_000_000))
    msg = unary_request(0)

    if target == "zrpc":
        client = await zrpc_client(address)
        stream = await client.bidirectional_stream("Echo/Chat", dict, dict)

        async def rt() -> None:
            await stream.send(msg)
            if await stream.receive() is None:
                raise RuntimeError("stream ended")

        async def closer() -> None:
            await stream.close()
            await client.close()
    elif target == "grpc":
        from bench import grpc_peer

        ch = grpc_peer.channel(address, tls_dir())
        await ch.channel_ready()
        call = grpc_peer.Stubs(ch).chat()

        async def rt() -> None:
            await call.write(msg)
            await call.read()

        async def closer() -> None:
            call.cancel()
            await ch.close()
    else:
        raise ValueError(target)

    async def worker() -> None:
        nonlocal ops
        while not win.stopping and ops < max_ops:
            t0 = now()
            await rt()
            if win.measuring:
                lat.append(now() - t0)
                ops += 1

    await win.run([asyncio.create_task(worker())])
    await closer()
    return win.result(ops, lat, "round trips/s")


# ===================================================================== zmq hop
def run_zmq_hop(spec: dict[str, Any]) -> dict[str, Any]:
    """Raw pyzmq DEALER -> ROUTER echo over ipc://, ``concurrency`` messages in flight."""
    import zmq

    depth = int(spec.get("concurrency", 64))
    max_ops = int(spec.get("max_ops", 50_000_000))
    win = Window(spec)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(spec["endpoint"])
    payload = BODY_100.encode()
    sent: collections.deque[float] = collections.deque()
    lat = array("d")
    ops = 0
    start = now()
    t_begin = start + win.warmup
    t_end = t_begin + win.duration
    for _ in range(depth):
        sent.append(now())
        sock.send(payload, copy=False)
    recv, send = sock.recv, sock.send
    try:
        while True:
            recv(copy=False)
            t = now()
            t0 = sent.popleft()
            if win.measuring:
                ops += 1
                lat.append(t - t0)
                if t >= t_end or ops >= max_ops:
                    win.end()
                    break
            elif t >= t_begin:
                win.begin()
            sent.append(t)
            send(payload, copy=False)
        for _ in range(len(sent)):
            recv(copy=False)
    finally:
        sock.close(0)
        ctx.term()
    return win.result(ops, lat, "round trips/s", concurrency=depth)


# ================================================================== fan-out
def _hist(samples_ns: array[int]) -> tuple[list[int], float]:
    import numpy as np

    edges = np.geomspace(HIST_LO, HIST_HI, HIST_BINS + 1)
    a = np.frombuffer(samples_ns, dtype=np.int64).astype(np.float64) / 1e9 if len(samples_ns) else np.zeros(0)
    counts, _ = np.histogram(np.clip(a, HIST_LO, HIST_HI), bins=edges)
    return [int(c) for c in counts], float(a.max()) if a.size else 0.0


async def run_fanout_sub(spec: dict[str, Any]) -> dict[str, Any]:
    """``subscribers`` streams over ``connections`` connections; per-step latency histograms."""
    target, address, topic = spec["target"], spec["address"], spec.get("topic", "room")
    subs, conns = int(spec["subscribers"]), int(spec["connections"])
    stop_file, ready_file = Path(spec["stop_file"]), Path(spec["ready_file"])
    progress_file = Path(spec["progress_file"])
    max_time = float(spec.get("max_time", 600))
    lat: dict[int, array[int]] = {}
    last_ns: dict[int, int] = {}
    ended: list[str] = []
    attached = 0
    all_attached = asyncio.Event()
    mono = time.monotonic_ns

    def record(body: str) -> None:
        t = mono()
        step, sent = parse_fanout_body(body)
        a = lat.get(step)
        if a is None:
            a = lat[step] = array("q")
        a.append(t - sent)
        last_ns[step] = t

    def one_attached() -> None:
        nonlocal attached
        attached += 1
        if attached == subs:
            all_attached.set()

    closers: list[Callable[[], Awaitable[Any]]] = []
    if target == "zrpc":
        clients = [await zrpc_client(address) for _ in range(conns)]
        closers = [c.close for c in clients]

        async def subscriber(k: int) -> None:
            stream = await clients[k % conns].server_stream("Echo/Listen", {"key": topic}, dict)
            try:
                first = await stream.next()
                assert first is not None and first.get("attached")
                one_attached()
                async for ev in stream:
                    record(ev["body"])
            except Exception as exc:
                ended.append(f"{type(exc).__name__}: {exc}")
            finally:
                await stream.close()
    elif target == "grpc":
        import grpc

        from bench import grpc_peer

        tdir = tls_dir()
        channels = [grpc_peer.channel(address, tdir) for _ in range(conns)]
        for ch in channels:
            await ch.channel_ready()
        stubs = [grpc_peer.Stubs(ch) for ch in channels]
        closers = [ch.close for ch in channels]

        async def subscriber(k: int) -> None:
            call = stubs[k % conns].listen({"key": topic})
            try:
                first = await call.read()
                assert first is not grpc.aio.EOF and first.get("attached")
                one_attached()
                while True:  # read() and async iteration cannot be mixed on one call
                    ev = await call.read()
                    if ev is grpc.aio.EOF:
                        break
                    record(ev["body"])
            except Exception as exc:
                ended.append(f"{type(exc).__name__}: {exc}")
            finally:
                call.cancel()
    else:
        raise ValueError(target)

    tasks = [asyncio.create_task(subscriber(k)) for k in range(subs)]
    await asyncio.wait_for(all_attached.wait(), 60)
    tmp_ready = ready_file.with_suffix(".tmp")  # whole or absent: the orchestrator reads it at once
    tmp_ready.write_text(json.dumps({"pid": os.getpid(), "subscribers": subs}))
    os.replace(tmp_ready, ready_file)
    deadline = time.monotonic() + max_time
    while not stop_file.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        tmp = progress_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"counts": {str(s): len(a) for s, a in lat.items()},
                                   "alive": subs - len(ended)}))
        os.replace(tmp, progress_file)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in closers:
        await c()
    steps = {}
    for step, a in sorted(lat.items()):
        counts, mx = _hist(a)
        steps[str(step)] = {"count": len(a), "hist": counts, "max_s": mx, "last_ns": last_ns[step]}
    return {"steps": steps, "ended": len(ended), "end_reasons": sorted(set(ended))[:5],
            "subscribers": subs}


async def run_fanout_pub(spec: dict[str, Any]) -> dict[str, Any]:
    """Publish at stepped rates (``count`` batches ``batch_hz`` times a second)."""
    target, address, topic = spec["target"], spec["address"], spec.get("topic", "room")
    rates = [float(r) for r in spec["rates"]]
    step_s, drain_s = float(spec["step_s"]), float(spec["drain_s"])
    batch_hz = float(spec.get("batch_hz", 50))
    progress = [Path(p) for p in spec.get("progress_files", [])]
    subs_total = int(spec.get("subscribers_total", 1000))
    mono = time.monotonic_ns

    if target == "zrpc":
        client = await zrpc_client(address)

        async def publish(count: int, body: str) -> Any:
            return await client.unary("Echo/Publish", {"key": topic, "count": count, "body": body}, dict)
        closer = client.close
    else:
        from bench import grpc_peer

        ch = grpc_peer.channel(address, tls_dir())
        await ch.channel_ready()
        stubs = grpc_peer.Stubs(ch)

        async def publish(count: int, body: str) -> Any:
            return await stubs.publish({"key": topic, "count": count, "body": body})
        closer = ch.close

    def delivered(step: int) -> int:
        n = 0
        for p in progress:
            try:
                n += int(json.loads(p.read_text())["counts"].get(str(step), 0))
            except (OSError, ValueError, KeyError):
                pass
        return n

    out = []
    for step, rate in enumerate(rates, start=1):
        server = CpuMeter(spec.get("server_pids", [])).start()
        load = CpuMeter([os.getpid(), *spec.get("load_pids", [])], tree=False).start()
        bg = Background().start()
        start_ns = mono()
        published = 0
        call_lat = array("d")
        tick = 1.0 / batch_hz
        t_start = now()
        k = 0
        while True:
            elapsed = now() - t_start
            if elapsed >= step_s:
                break
            want = int(rate * min(step_s, elapsed + tick)) - published
            if want > 0:
                t0 = now()
                await publish(want, fanout_body(step, mono()))
                call_lat.append(now() - t0)
                published += want
            k += 1
            delay = t_start + k * tick - now()
            if delay > 0:
                await asyncio.sleep(delay)
        end_ns = mono()
        offered = published * subs_total
        # drain: wait until the subscribers have everything, at most drain_s
        t_drain = now()
        while now() - t_drain < drain_s and delivered(step) < offered:
            await asyncio.sleep(0.1)
        got = delivered(step)
        server.stop()
        load.stop()
        bg.stop()
        out.append({"background_cores": bg.cores(server.total + load.total),
                    "step": step, "rate": rate, "published": published, "offered": offered,
                    "start_ns": start_ns, "end_ns": end_ns, "server_cpu_s": server.total,
                    "load_cpu_s": load.total, "publish_call_ms": summarize(call_lat),
                    "delivered_at_drain": got})
        if got < 0.5 * offered:
            break  # saturated: later steps would only pile up behind this one
        await asyncio.sleep(min(0.5, drain_s))
    await closer()
    return {"steps": out}


# ======================================================================= idle
async def run_idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Open ``n`` TLS connections (zrpc: TLS + HELLO), hold them, report the server's RSS growth."""
    target, address, n = spec["target"], spec["address"], int(spec["n"])
    rss_pid = int(spec["rss_pid"])
    parallel = int(spec.get("parallel", 64))
    hold = float(spec.get("hold", 2.0))
    max_time = float(spec.get("max_time", 120))
    held: list[Any] = []
    failures: list[str] = []

    async def open_one() -> Any:
        if target == "zrpc":
            return await zrpc_client(address)
        transport, _ = await bare_connect(address, asyncio.Protocol)
        transport.write(b"I")
        return transport

    async def close_one(c: Any) -> None:
        if target == "zrpc":
            await c.close()
        else:
            c.close()

    # warm-up: the server's first connections allocate pools and caches; don't count them
    warm = [await open_one() for _ in range(20)]
    for c in warm:
        await close_one(c)
    await asyncio.sleep(1.0)
    rss_before = rss_kib(rss_pid)
    server = CpuMeter([int(p) for p in spec.get("server_pids", [])]).start()
    load = CpuMeter([os.getpid()], tree=False).start()
    bg = Background().start()
    sem = asyncio.Semaphore(parallel)
    t0 = now()
    deadline = t0 + max_time

    async def opener() -> None:
        async with sem:
            if now() > deadline:
                failures.append("time limit")
                return
            try:
                held.append(await open_one())
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(opener() for _ in range(n)))
    connect_s = now() - t0
    server.stop()
    load.stop()
    bg.stop()
    await asyncio.sleep(hold)
    rss_after = rss_kib(rss_pid)
    await asyncio.sleep(hold)
    rss_after2 = rss_kib(rss_pid)
    ok = len(held)
    for c in held:
        await close_one(c)
    await asyncio.sleep(0.2)
    growth = max(rss_after, rss_after2) - rss_before
    return {"ops": ok, "elapsed_s": round(connect_s, 3),
            "throughput": round(ok / connect_s, 1) if connect_s else 0.0, "unit": "connections/s",
            "connections": ok, "failed": len(failures), "failure_reasons": sorted(set(failures))[:5],
            "rss_before_kib": rss_before, "rss_after_kib": max(rss_after, rss_after2),
            "rss_per_connection_kib": round(growth / ok, 2) if ok else None,
            "server_cpu_s": server.total, "load_cpu_s": load.total,
            "background_cores": bg.cores(server.total + load.total),
            "latency_ms": summarize([])}


# ======================================================================= main
async def run_connect(spec: dict[str, Any]) -> dict[str, Any]:
    """Connection set-up, one after another: TLS or QUIC handshake plus the HELLO exchange.

    QUIC resumes the TLS session from the previous connection's ticket unless ``fresh``.
    """
    address = spec["address"]
    fresh = bool(spec.get("fresh"))
    win = Window(spec)
    lat = array("d")
    ops = 0
    tickets: Any = None
    if fresh and address.startswith("quic://"):
        from zrpc.quic import CLIENT_TICKETS as tickets

    async def worker() -> None:
        nonlocal ops
        while not win.stopping:
            if tickets is not None:
                tickets.clear()
            t0 = now()
            client = await zrpc_client(address)
            if win.measuring:
                lat.append(now() - t0)
                ops += 1
            await client.close()

    await win.run([asyncio.create_task(worker())])
    return win.result(ops, lat, "connections/s")


KINDS: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]] = {
    "unary": run_unary,
    "stream": run_stream,
    "pingpong": run_pingpong,
    "fanout_sub": run_fanout_sub,
    "fanout_pub": run_fanout_pub,
    "idle": run_idle,
    "connect": run_connect,
    "hostile": run_hostile,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    raise_nofile()
    kind = spec["kind"]
    if kind == "zmq_hop":
        result = run_zmq_hop(spec)
    elif spec.get("target") == "grpc" and spec.get("loop", "default") == "default":
        result = asyncio.run(KINDS[kind](spec))  # grpc.aio on its default loop
    else:
        import uvloop

        result = uvloop.run(KINDS[kind](spec))
    emit_result({"spec": {k: v for k, v in spec.items() if k not in ("server_pids", "load_pids")},
                 **result})


if __name__ == "__main__":
    main()
