"""The orchestrator: start each server in its own process, drive it from load processes, record.

``run(options)`` executes the selected scenarios in order, each with fresh
server processes, and writes ``<out>/<name>.json`` plus PNG plots next to it.
A scenario that fails is recorded with its error and the run goes on.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_info, raise_nofile, wait_quiet
from bench.procs import PY, BenchError, ProcSet

SCENARIOS = ["unary", "server_stream", "pingpong", "broker_hop", "fanout", "idle", "durable_chat", "quic"]
TITLES = {
    "unary": "1. Unary round trip, 100-byte payload",
    "server_stream": "2. Server streaming, 64-byte messages",
    "pingpong": "3. Bidi ping-pong latency, one stream",
    "broker_hop": "4. Broker <-> worker hop",
    "fanout": "5. Room fan-out to 1,000 subscribers",
    "idle": "6. Idle TLS connections: server RSS per connection",
    "durable_chat": "7. Durable chat sends (Chat/SendMessage, 2 workers)",
    "quic": "8. zrpc over QUIC beside zrpc over TLS/TCP (in-process server, both listeners)",
    "hostile": "9. Hostile clients: presence storm, huge windows, connection churn (broker RSS, bystander)",
}
#: Run only when asked (``--only hostile``): it measures memory, not speed, and takes ~2 minutes.
EXTRA_SCENARIOS = ["hostile"]


@dataclass
class Mode:
    quick: bool
    warmup: float
    duration: float
    fanout_rates: list[int]
    fanout_step: float
    fanout_drain: float
    idle_connections: int
    profile: bool = False
    py_spy: str = ""

    @classmethod
    def make(cls, quick: bool) -> Mode:
        if quick:
            return cls(True, 0.3, 1.2, [50, 150], 1.0, 1.0, 500)
        return cls(False, 1.0, 6.0, [5, 15, 50, 100, 150, 200, 300, 400], 4.0, 2.0, 10_000)


@dataclass
class Context:
    mode: Mode
    procs: ProcSet
    workdir: Path
    out: Path
    name: str
    results: dict[str, Any] = field(default_factory=dict)

    def timed(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {"warmup": self.mode.warmup, "duration": self.mode.duration, **spec}

    def load_timeout_for(self, spec: dict[str, Any]) -> float:
        return float(spec["warmup"]) + float(spec["duration"]) + 60

    def measure(self, srv: dict[str, Any], spec: dict[str, Any], label: str,
                profile_name: str | None = None) -> dict[str, Any]:
        """One load process against one server; optional py-spy profile of the server tree."""
        spec = self.timed({**spec, "address": srv.get("address"), "server_pids": [srv["pid"]]})
        spy = self._start_profile(srv, profile_name, spec["warmup"] + spec["duration"])
        prof = None
        try:
            r = self.procs.load(spec, label.replace(" ", "_"), self.load_timeout_for(spec))
        finally:
            if spy is not None:
                prof = self._finish_profile(*spy)
        if prof is not None:
            r["profile"] = prof
        return r

    # -------------------------------------------------------------- profiling
    def _start_profile(self, srv: dict[str, Any], name: str | None,
                       seconds: float) -> tuple[subprocess.Popen[bytes], Path] | None:
        if not (self.mode.profile and name and self.mode.py_spy):
            return None
        pdir = self.out / f"{self.name}-profiles"
        pdir.mkdir(parents=True, exist_ok=True)
        raw = pdir / f"{name}.txt"
        argv = [self.mode.py_spy, "record", "--pid", str(srv["pid"]), "--subprocesses", "--nonblocking",
                "--rate", "250", "--duration", str(max(1, round(seconds))), "--format", "raw",
                "-o", str(raw)]
        return self.procs.spawn(argv, f"py-spy-{name}"), raw

    def _finish_profile(self, p: subprocess.Popen[bytes], raw: Path) -> dict[str, Any]:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            self.procs.stop(p)
        if p in self.procs.live:
            self.procs.live.remove(p)
        from bench.profiles import top_functions

        if not raw.exists():
            return {"error": "py-spy wrote nothing", "log": self.procs.log_tail(p, 500)}
        return {"file": str(raw.relative_to(self.out)), **top_functions(raw)}


def case(impl: str, label: str, r: dict[str, Any], **extra: Any) -> dict[str, Any]:
    ops = r.get("ops") or 0
    el = r.get("elapsed_s") or 0
    out = {"impl": impl, "label": label, **extra, **{k: v for k, v in r.items() if k != "spec"}}
    if ops and r.get("server_cpu_s") is not None:
        out["server_cpu_us_per_op"] = round(r["server_cpu_s"] / ops * 1e6, 2)
        out["load_cpu_us_per_op"] = round(r["load_cpu_s"] / ops * 1e6, 2)
    if el:
        out["server_cores"] = round(r.get("server_cpu_s", 0) / el, 2)
        out["load_cores"] = round(r.get("load_cpu_s", 0) / el, 2)
    return out


def _target(impl: str) -> str:
    return "zrpc" if impl.startswith("zrpc") else "grpc" if impl.startswith("grpc") else impl


def _peer(impl: str) -> dict[str, str]:
    """The load spec's ``target`` and ``loop`` for a server kind (grpc.aio runs on either loop)."""
    return {"target": _target(impl), "loop": "uvloop" if impl == "grpc-uvloop" else "default"}


GRPC = ("grpc", "grpc-uvloop")


# ================================================================= scenarios
def s_unary(ctx: Context) -> list[dict[str, Any]]:
    cases = []
    for impl in ("zrpc", "zrpc-broker", *GRPC, "bare"):
        with ctx.procs.server(impl, app="tests.apps.echo:app", workers=2) as srv:
            for conc in (1, 64):
                r = ctx.measure(srv, {"kind": "unary", **_peer(impl), "concurrency": conc},
                                f"unary {impl} c{conc}", f"unary-{impl}-c{conc}" if impl.startswith("zrpc") else None)
                cases.append(case(impl, f"c{conc}", r, concurrency=conc))
    return cases


def s_server_stream(ctx: Context) -> list[dict[str, Any]]:
    cases = []
    for impl in ("zrpc", "zrpc-broker", *GRPC, "bare"):
        with ctx.procs.server(impl, app="bench.apps:app", workers=2) as srv:
            for streams in ((1,) if impl == "bare" else (1, 100)):
                # 100 streams start with a stall of a few seconds (see docs/performance.md): warm up past it
                warm = max(ctx.mode.warmup, 4.0) if streams > 1 else ctx.mode.warmup
                r = ctx.measure(srv, {"kind": "stream", **_peer(impl), "streams": streams,
                                      "warmup": warm},
                                f"stream {impl} s{streams}",
                                f"stream-{impl}-s{streams}" if impl.startswith("zrpc") else None)
                cases.append(case(impl, f"{streams} stream{'s' if streams > 1 else ''}", r, streams=streams))
    return cases


def _merge_rounds(impl: str, label: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One case from interleaved rounds: summed counts and CPU, median percentiles, overall max."""
    import statistics

    ops = sum(r["ops"] for r in rounds)
    el = sum(r["elapsed_s"] for r in rounds)
    lat: dict[str, Any] = {}
    for q in ("p50", "p90", "p99", "mean"):
        vals = [r["latency_ms"][q] for r in rounds if r["latency_ms"].get(q) is not None]
        lat[q] = round(statistics.median(vals), 4) if vals else None
    lat["max"] = max((r["latency_ms"]["max"] or 0 for r in rounds), default=None)
    lat["n"] = sum(r["latency_ms"]["n"] for r in rounds)
    merged = {"ops": ops, "elapsed_s": round(el, 4), "throughput": round(ops / el, 1) if el else 0.0,
              "unit": rounds[0]["unit"], "latency_ms": lat,
              "server_cpu_s": round(sum(r["server_cpu_s"] for r in rounds), 3),
              "load_cpu_s": round(sum(r["load_cpu_s"] for r in rounds), 3),
              "background_cores": max(r.get("background_cores", 0) for r in rounds),
              "rounds": [{"throughput": r["throughput"], "latency_ms": r["latency_ms"]} for r in rounds]}
    profiles = [r["profile"] for r in rounds if "profile" in r]
    if profiles:
        merged["profile"] = profiles[0]
    return case(impl, label, merged)


def s_pingpong(ctx: Context) -> list[dict[str, Any]]:
    """All four servers up at once, measured in 3 interleaved rounds: latency on a shared
    2-core machine drifts with placement and neighbours, and interleaving spreads that over
    every peer instead of penalising whichever ran during a bad second."""
    impls = ("zrpc", "zrpc-broker", *GRPC, "bare")
    rounds = 3 if ctx.mode.quick else 5
    per_round = max(0.5, ctx.mode.duration / rounds)
    with contextlib.ExitStack() as stack:
        srvs = {impl: stack.enter_context(ctx.procs.server(impl, app="tests.apps.echo:app", workers=1))
                for impl in impls}
        results: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        for k in range(rounds):
            for impl in impls:
                prof = f"pingpong-{impl}" if impl.startswith("zrpc") and k == 0 else None
                results[impl].append(ctx.measure(srvs[impl], {"kind": "pingpong", **_peer(impl),
                                                              "duration": per_round},
                                                 f"pingpong {impl} r{k}", prof))
    return [_merge_rounds(impl, "1 stream", results[impl]) for impl in impls]


def s_broker_hop(ctx: Context) -> list[dict[str, Any]]:
    """The broker with its default local link (Unix stream socket), the same over ZeroMQ, raw pyzmq."""
    cases = []
    for impl, extra in (("zrpc-broker", ()), ("zrpc-broker-zmq", ("--local-link", "zmq"))):
        with ctx.procs.server("zrpc-broker", app="tests.apps.echo:app", workers=1, extra=extra) as srv:
            r = ctx.measure(srv, {"kind": "unary", "target": "zrpc", "concurrency": 64},
                            f"hop {impl} c64", f"hop-{impl}-c64")
            cases.append(case(impl, "Echo/Say c64, 1 worker" + (", ZeroMQ link" if extra else ""), r,
                              concurrency=64))
    with ctx.procs.server("zmq") as srv:
        r = ctx.measure(srv, {"kind": "zmq_hop", "endpoint": srv["endpoint"], "concurrency": 64},
                        "hop raw-zmq c64")
        cases.append(case("raw-pyzmq", "DEALER/ROUTER echo, 64 in flight", r, concurrency=64))
    return cases


def _hist_quantile(hist: list[int], q: float) -> float | None:
    from bench.load import HIST_BINS, HIST_HI, HIST_LO

    total = sum(hist)
    if not total:
        return None
    ratio = (HIST_HI / HIST_LO) ** (1 / HIST_BINS)
    need = q * total
    cum = 0
    for i, c in enumerate(hist):
        cum += c
        if cum >= need:
            return HIST_LO * ratio ** (i + 1)  # upper edge of the bin: never optimistic
    return HIST_HI


def s_fanout(ctx: Context) -> list[dict[str, Any]]:
    m = ctx.mode
    cases: list[dict[str, Any]] = []
    subs_per_proc, procs_n, conns_per_proc = 500, 2, 5
    for impl in ("zrpc-broker", *GRPC):
        with ctx.procs.server(impl, app="tests.apps.echo:app", workers=2) as srv:
            tag = f"fanout-{impl}-{ctx.procs._n}"
            stop = ctx.workdir / f"{tag}.stop"
            subs: list[subprocess.Popen[bytes]] = []
            progress: list[str] = []
            spy = None
            profile = None
            try:
                for k in range(procs_n):
                    ready = ctx.workdir / f"{tag}-sub{k}.ready"
                    prog = ctx.workdir / f"{tag}-sub{k}.progress"
                    progress.append(str(prog))
                    spec = {"kind": "fanout_sub", **_peer(impl), "address": srv["address"],
                            "subscribers": subs_per_proc, "connections": conns_per_proc,
                            "ready_file": str(ready), "stop_file": str(stop), "progress_file": str(prog),
                            "max_time": 60 + len(m.fanout_rates) * (m.fanout_step + m.fanout_drain + 1) * 2}
                    p = ctx.procs.start_load(spec, f"fanout-sub-{impl}-{k}")
                    subs.append(p)
                    ctx.procs.wait_ready(p, ready, timeout=90)
                pub_spec = {"kind": "fanout_pub", **_peer(impl), "address": srv["address"],
                            "rates": m.fanout_rates, "step_s": m.fanout_step, "drain_s": m.fanout_drain,
                            "batch_hz": 50, "progress_files": progress,
                            "subscribers_total": subs_per_proc * procs_n,
                            "server_pids": [srv["pid"]], "load_pids": [p.pid for p in subs]}
                seconds = len(m.fanout_rates) * (m.fanout_step + m.fanout_drain + 1)
                spy = ctx._start_profile(srv, "fanout-zrpc-broker" if impl.startswith("zrpc") else None,
                                         min(seconds, 20))
                pub = ctx.procs.load(pub_spec, f"fanout-pub-{impl}", seconds + 90)
                stop.write_text("stop")
                sub_results = [ctx.procs.finish_load(p, 60) for p in subs]
            finally:
                stop.write_text("stop")
                if spy is not None:
                    profile = ctx._finish_profile(*spy)
                for p in subs:
                    ctx.procs.stop(p)
            n_subs = sum(r["subscribers"] for r in sub_results)
            ended = sum(r["ended"] for r in sub_results)
            for st in pub["steps"]:
                key = str(st["step"])
                parts = [r["steps"][key] for r in sub_results if key in r["steps"]]
                delivered = sum(p["count"] for p in parts)
                hist = [sum(col) for col in zip(*(p["hist"] for p in parts), strict=True)] if parts else []
                last_ns = max((p["last_ns"] for p in parts), default=st["end_ns"])
                window = max(m.fanout_step, (last_ns - st["start_ns"]) / 1e9)
                q = {k: _hist_quantile(hist, f) for k, f in (("p50", .5), ("p90", .9), ("p99", .99))}
                lat = {k: (round(v * 1e3, 3) if v is not None else None) for k, v in q.items()}
                lat["max"] = round(max((p["max_s"] for p in parts), default=0) * 1e3, 3)
                lat["n"] = delivered
                c = {"impl": impl, "label": f"{int(st['rate'])} ev/s", "rate": st["rate"],
                     "offered_per_s": st["rate"] * n_subs, "published": st["published"],
                     "offered": st["offered"], "delivered": delivered,
                     "delivered_ratio": round(delivered / st["offered"], 4) if st["offered"] else None,
                     "ops": delivered, "elapsed_s": round(window, 3),
                     "throughput": round(delivered / window, 1), "unit": "deliveries/s",
                     "latency_ms": lat, "server_cpu_s": st["server_cpu_s"], "load_cpu_s": st["load_cpu_s"],
                     "publish_call_ms": st["publish_call_ms"], "subscribers": n_subs,
                     "background_cores": st.get("background_cores"),
                     "streams_ended": ended, "end_reasons": sorted({e for r in sub_results for e in r["end_reasons"]})}
                if delivered:
                    c["server_cpu_us_per_op"] = round(st["server_cpu_s"] / delivered * 1e6, 2)
                cases.append(c)
            if profile is not None and cases:
                cases[-1]["profile"] = profile
    return cases


def s_idle(ctx: Context) -> list[dict[str, Any]]:
    cases = []
    n = ctx.mode.idle_connections
    limit = raise_nofile()
    if n > limit - 1000:
        n = max(100, limit - 1000)
    for impl in ("zrpc-broker", "bare"):
        with ctx.procs.server(impl, app="tests.apps.echo:app", workers=2) as srv:
            spec = {"kind": "idle", **_peer(impl), "address": srv["address"], "n": n,
                    "rss_pid": srv["pid"], "server_pids": [srv["pid"]], "parallel": 64,
                    "hold": 1.0 if ctx.mode.quick else 2.0, "max_time": 240}
            r = ctx.procs.load(spec, f"idle-{impl}", 400)
            cases.append(case(impl, f"{n} connections", r, connections_wanted=n))
    return cases


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    """A PostgreSQL server for the bench (fsync on, as in production); its database URL."""
    from tests.pgserver import PostgresServer, find_bindir, missing_reason

    why = missing_reason()
    bindir = find_bindir()
    if why is not None or bindir is None:
        raise BenchError(f"PostgreSQL store case: {why}")
    server = PostgresServer(bindir, fsync=True)
    try:
        server.start()
        yield server.new_database()
    finally:
        server.stop()


def s_durable_chat(ctx: Context) -> list[dict[str, Any]]:
    """Acked sends through the SQLite store (default), with and without idempotency keys,
    Echo/Say through a broker with the same 2 workers (the ceiling goal 7 compares with), then
    the sends through PostgreSQL."""
    spec = {"kind": "unary", "target": "zrpc", "concurrency": 64, "method": "Chat/SendMessage",
            "rooms": 64}
    cases = []
    with ctx.procs.server("zrpc-broker", app=None, workers=2) as srv:
        r = ctx.measure(srv, spec, "chat zrpc-broker c64", "chat-zrpc-broker-c64")
        cases.append(case("zrpc-broker", "Chat/SendMessage c64, 64 rooms", r, concurrency=64,
                          store="sqlite", method="Chat/SendMessage"))
        # the same with an idempotency key per message: the cost of the dedupe index
        r = ctx.measure(srv, {**spec, "keyed": True}, "chat zrpc-broker keyed c64",
                        "chat-zrpc-broker-keyed-c64")
        cases.append(case("zrpc-broker", "SendMessage c64, idempotency keys", r, concurrency=64,
                          store="sqlite", keyed=True, method="Chat/SendMessage"))
    with ctx.procs.server("zrpc-broker", app="tests.apps.echo:app", workers=2) as srv:
        r = ctx.measure(srv, {"kind": "unary", "target": "zrpc", "concurrency": 64},
                        "chat-ceiling zrpc-broker c64")
        cases.append(case("zrpc-broker", "Echo/Say c64, 2 workers (ceiling)", r, concurrency=64,
                          method="Echo/Say"))
    with _postgres() as url, \
            ctx.procs.server("zrpc-broker", app=None, workers=2, extra=("--store", url)) as srv:
        r = ctx.measure(srv, spec, "chat zrpc-broker pg c64", "chat-zrpc-broker-pg-c64")
        cases.append(case("zrpc-broker-pg", "SendMessage c64, PostgreSQL store", r, concurrency=64,
                          store="postgresql", method="Chat/SendMessage"))
    return cases


QUIC_CASES: list[tuple[str, dict[str, Any]]] = [
    ("unary c1", {"kind": "unary", "concurrency": 1}),
    ("unary c64", {"kind": "unary", "concurrency": 64}),
    ("1 stream", {"kind": "stream", "streams": 1}),
    ("100 streams", {"kind": "stream", "streams": 100}),
    ("ping-pong", {"kind": "pingpong"}),
    ("connection set-up", {"kind": "connect", "fresh": True}),
    ("connection set-up, resumed", {"kind": "connect", "transports": ("quic",)}),
]


#: --quick keeps scenario 8 short: one case of each kind.
QUICK_QUIC_CASES = ("unary c64", "1 stream", "ping-pong", "connection set-up")


def s_quic(ctx: Context) -> list[dict[str, Any]]:
    """Each case over TLS/TCP, then over QUIC, against one server process with both listeners:
    the two transports of a case run back to back, so their ratio is fair even on a busy machine."""
    cases = []
    with ctx.procs.server("zrpc", app="bench.apps:app") as srv:
        if "quic" not in srv:
            raise BenchError("this zrpc version has no QUIC listener (Server.bind_quic)")
        addresses = {"tls": srv["address"], "quic": srv["quic"]}
        for label, spec in QUIC_CASES:
            if ctx.mode.quick and label not in QUICK_QUIC_CASES:
                continue
            spec = dict(spec)
            transports = spec.pop("transports", ("tls", "quic"))
            if spec.get("streams", 1) > 1 and not ctx.mode.quick:  # as in scenario 2: warm up past
                spec = {**spec, "warmup": max(ctx.mode.warmup, 4.0)}   # the start of 100 streams
            for transport, address in addresses.items():
                if transport not in transports:
                    continue
                slug = label.replace(" ", "-")
                r = ctx.measure({**srv, "address": address}, {**spec, "target": "zrpc"},
                                f"quic-scenario {transport} {label}", f"quic-{transport}-{slug}")
                cases.append(case(f"zrpc-{transport}", label, r, transport=transport))
    return cases


def s_hostile(ctx: Context) -> list[dict[str, Any]]:
    quick = ctx.mode.quick
    spec = {"kind": "hostile", "target": "zrpc",
            "storm_conns": 3, "storm_streams": 200 if quick else 1000, "storm_hold_s": 3 if quick else 10,
            "flood_events": 2000 if quick else 20_000, "flood_size": 4096,
            "churn_rounds": 3 if quick else 7, "settle_s": 3 if quick else 10}
    with ctx.procs.server("zrpc-broker", app=None, workers=2) as srv:
        spec |= {"address": srv["address"], "rss_pid": srv["pid"], "server_pids": [srv["pid"]]}
        r = ctx.procs.load(spec, "hostile", 600)
    cases = []
    for attack, label in (("storm", f"presence storm 3 x {spec['storm_streams']} streams"),
                          ("flood", f"huge windows, {spec['flood_events']} x 4 KiB events")):
        a = r[attack]
        cases.append({"impl": "zrpc-broker", "label": label, "attack": attack, "throughput": a["peak_mib"],
                      "unit": "MiB peak RSS", "latency_ms": a["bystander_ms"], **a})
    for kind, c in r["churn"].items():
        cases.append({"impl": "zrpc-broker", "label": f"churn {kind}, 200 per round", "attack": f"churn_{kind}",
                      "throughput": c["growth_after_first_mib"], "unit": "MiB growth", "latency_ms": {}, **c})
    return cases


RUNNERS: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "unary": s_unary,
    "server_stream": s_server_stream,
    "pingpong": s_pingpong,
    "broker_hop": s_broker_hop,
    "fanout": s_fanout,
    "idle": s_idle,
    "durable_chat": s_durable_chat,
    "quic": s_quic,
    "hostile": s_hostile,
}


# ======================================================================== run
def _on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run_scenario(ctx: Context, s: str, noise: bool, wait_quiet_s: float) -> dict[str, Any]:
    """One pass of one scenario (optionally with the background load running)."""
    t0 = time.time()
    entry: dict[str, Any] = {"title": TITLES[s], "cases": [], "error": None, "noise": noise}
    if wait_quiet_s > 0:
        entry["background_cores_before"] = wait_quiet(wait_quiet_s)
    print(f"[bench] {s}{' (noise)' if noise else ''} ...", flush=True)
    load = ctx.procs.spawn([PY, "-m", "bench.noise", "--max-time", "1800"], "noise") if noise else None
    try:
        entry["cases"] = RUNNERS[s](ctx)
    except (BenchError, OSError, KeyError, ValueError, RuntimeError) as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc()[-3000:]
        print(f"[bench] {s} FAILED: {entry['error'][:2000]}", flush=True)
    finally:
        if load is not None:
            ctx.procs.stop(load)
    entry["wall_s"] = round(time.time() - t0, 1)
    for c in entry["cases"]:
        lat = c.get("latency_ms") or {}
        print(f"[bench]   {c['impl']:<12} {c['label']:<34} {c['throughput']:>12,.0f} {c['unit']:<14}"
              f" p50 {lat.get('p50')} p99 {lat.get('p99')} ms"
              f"  cpu server {c.get('server_cpu_s')} s load {c.get('load_cpu_s')} s"
              f"  background {c.get('background_cores')} cores", flush=True)
    return entry


def run(quick: bool, out: Path, only: list[str] | None, name: str, profile: bool = False,
        keep_workdir: bool = False, wait_quiet_s: float = 0.0, repeat: int = 1,
        noise: bool = False) -> Path:
    """Run the selected scenarios ``repeat`` times, interleaved (every scenario once per round),
    each round with a quiet pass and, with ``noise``, a pass under background load right after it.
    """
    mode = Mode.make(quick)
    if repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    if profile:
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(spy).exists():
            raise SystemExit("--profile needs py-spy: pip install py-spy")
        mode.profile, mode.py_spy = True, spy
    selected = only or SCENARIOS
    unknown = [s for s in selected if s not in RUNNERS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {SCENARIOS + EXTRA_SCENARIOS}")
    out.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="zrpc-bench-"))
    home = workdir / "home"
    env = dict(os.environ)
    env["ZRPC_HOME"] = str(home)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    env.pop("XDG_RUNTIME_DIR", None)
    os.environ["ZRPC_HOME"] = str(home)
    from zrpc.tls import ensure_development_ca

    ensure_development_ca(home)  # once, before any server races to create it
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs = ProcSet(workdir, env)
    ctx = Context(mode, procs, workdir, out, name)
    started = time.time()
    results: dict[str, Any] = {
        "name": name, "mode": "quick" if quick else "full",
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": asdict(mode) | {"py_spy": None, "repeat": repeat, "noise": noise},
        "machine": machine_info(), "scenarios": {},
    }
    ctx.results = results
    conditions = ("quiet", "noise") if noise else ("quiet",)
    # rounds[condition][k] = {scenario: entry}
    rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in conditions}
    try:
        for k in range(repeat):
            if repeat > 1:
                print(f"[bench] round {k + 1}/{repeat}", flush=True)
            for c in conditions:
                rounds[c].append({})
            for s in selected:
                for c in conditions:
                    rounds[c][k][s] = _run_scenario(ctx, s, c == "noise", wait_quiet_s)
    finally:
        procs.stop_all()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        results["wall_s"] = round(time.time() - started, 1)
        from bench.report import evaluate_rounds, merge_rounds

        results["scenarios"] = merge_rounds(rounds["quiet"])
        results["goals"] = evaluate_rounds(rounds["quiet"])
        if noise:
            from bench.report import compare_noise

            results["noise"] = {"scenarios": merge_rounds(rounds["noise"]),
                                "goals": evaluate_rounds(rounds["noise"])}
            compare_noise(results["goals"], results["noise"]["goals"])
        if repeat > 1 or noise:
            results["rounds"] = rounds
        path = out / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, path)
        try:
            from bench.report import plot

            results["plots"] = plot(results, out, name)
            tmp.write_text(json.dumps(results, indent=1))
            os.replace(tmp, path)
        except Exception as exc:  # plots are a bonus; the numbers are already saved
            print(f"[bench] plotting failed: {exc}", flush=True)
        if keep_workdir:
            print(f"[bench] logs kept in {workdir}", flush=True)
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
        print(f"[bench] wrote {path} in {results['wall_s']} s", flush=True)
    return path
