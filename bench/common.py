"""Shared by the orchestrator, the servers and the load generators.

Payloads (the same for every peer), /proc readers (CPU seconds of a process
tree, RSS), file-descriptor limits, latency summaries, machine information.
Nothing here imports grpc or matplotlib.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ------------------------------------------------------------------ payloads
#: Scenario 1 and 3: a 100-byte body in a {key, body} map (zrpc shards Echo/* by ``key``).
BODY_100 = "b" * 100
#: Scenario 2: every streamed message packs to 64 bytes (for i < 128; +1/+2 bytes above).
_PAD_64 = "p" * (64 - len(msgpack.packb({"i": 0, "pad": ""})))
#: Scenario 5: event bodies are 100 characters: step (4), send time in ns (20), padding.
FANOUT_BODY_LEN = 100


def unary_request(i: int) -> dict[str, Any]:
    return {"key": f"k{i}", "body": BODY_100}


def stream_message(i: int) -> dict[str, Any]:
    return {"i": i, "pad": _PAD_64}


def fanout_body(step: int, t_ns: int) -> str:
    head = f"{step:04d}{t_ns:020d}"
    return head + "x" * (FANOUT_BODY_LEN - len(head))


def parse_fanout_body(body: str) -> tuple[int, int]:
    return int(body[:4]), int(body[4:24])


# --------------------------------------------------------------------- /proc
def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()  # fields from 3 (state) on


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK  # fields 14 and 15 of /proc/<pid>/stat


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    parent_of: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f is not None:
                parent_of[int(entry.name)] = int(f[1])
    out = [pid]
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        out.extend(kids)
        frontier.extend(kids)
    return out


class CpuMeter:
    """CPU seconds used by process trees between :meth:`start` and :meth:`stop`.

    Children are found at start (the broker's workers); each is read
    individually because a parent's cutime only counts children it has reaped.
    """

    def __init__(self, pids: Iterable[int], tree: bool = True) -> None:
        self.roots = list(pids)
        self.tree = tree
        self.pids: list[int] = []
        self.before: dict[int, float] = {}
        self.used: dict[int, float] = {}

    def start(self) -> CpuMeter:
        pids: list[int] = []
        for r in self.roots:
            pids.extend(descendants(r) if self.tree else [r])
        self.pids = sorted(set(pids))
        self.before = {p: cpu_seconds(p) for p in self.pids}
        return self

    def stop(self) -> float:
        self.used = {p: max(0.0, cpu_seconds(p) - b) for p, b in self.before.items()}
        return self.total

    @property
    def total(self) -> float:
        return round(sum(self.used.values()), 3)


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return 0.0
    v = [int(x) for x in fields[:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK


class Background:
    """CPU the rest of the machine used during a window (other processes, kernel): a noise gauge."""

    def __init__(self) -> None:
        self.t0 = self.b0 = self.busy = self.elapsed = 0.0

    def start(self) -> Background:
        self.t0, self.b0 = time.monotonic(), machine_busy_seconds()
        return self

    def stop(self) -> Background:
        self.elapsed = time.monotonic() - self.t0
        self.busy = machine_busy_seconds() - self.b0
        return self

    def cores(self, ours: float) -> float:
        """Busy cores not explained by ``ours`` CPU seconds (our servers and load processes)."""
        return round(max(0.0, self.busy - ours) / self.elapsed, 2) if self.elapsed else 0.0


def wait_quiet(max_wait: float, below_cores: float = 0.3, sample: float = 2.0) -> float:
    """Wait (at most ``max_wait`` s) until the machine is nearly idle; returns the last busy-core reading."""
    deadline = time.monotonic() + max_wait
    while True:
        bg = Background().start()
        time.sleep(sample)
        cores = bg.stop().cores(0.0)
        if cores < below_cores or time.monotonic() >= deadline:
            return cores


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def raise_nofile(want: int | None = None) -> int:
    """Raise RLIMIT_NOFILE's soft limit (to the hard limit by default); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(hard, max(soft, want))
    if hard == resource.RLIM_INFINITY and want is None:
        target = max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def die_with_parent() -> None:
    """In a child between fork and exec: SIGTERM when the parent dies (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


# ----------------------------------------------------------------- latencies
def summarize(samples: Sequence[float] | Any, scale: float = 1e3) -> dict[str, float | None]:
    """p50/p90/p99/max (and mean) of latencies in seconds, reported in milliseconds."""
    import numpy as np

    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None, "n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": round(float(p50) * scale, 4), "p90": round(float(p90) * scale, 4),
            "p99": round(float(p99) * scale, 4), "max": round(float(a.max()) * scale, 4),
            "mean": round(float(a.mean()) * scale, 4), "n": int(a.size)}


def now() -> float:
    return time.perf_counter()


# -------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    versions: dict[str, str] = {}
    from importlib import metadata

    for pkg in ("zrpc", "uvloop", "pyzmq", "msgpack", "grpcio", "matplotlib", "numpy", "cryptography"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    import ssl

    import zmq

    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "openssl": ssl.OPENSSL_VERSION,
        "libzmq": zmq.zmq_version(),
        "packages": versions,
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
    }


def emit_result(result: dict[str, Any]) -> None:
    """A load generator's answer: one JSON line on stdout, prefixed so logs cannot be confused with it."""
    sys.stdout.write("BENCH-RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH-RESULT "):
            return dict(json.loads(line[len("BENCH-RESULT "):]))
    raise RuntimeError("the load generator printed no result")
