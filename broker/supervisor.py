"""Spawns and restarts the broker's shard workers (``zrpc-worker`` processes).

Each worker is started with ``PR_SET_PDEATHSIG`` (Linux) so it dies with the
broker even if the broker is SIGKILLed. A worker that exits is reported at
once (``on_exit``) and restarted with exponential backoff (0.1 s doubling to
5 s, reset after it stayed up for 10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Supervisor", "WorkerSpec"]

log = logging.getLogger("zrpc.broker.supervisor")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass(frozen=True)
class WorkerSpec:
    shard: int
    shards: int
    broker: str
    bus: str
    data_dir: str
    heartbeat_ms: int
    liveness: int
    log_level: str = "INFO"
    extra_args: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "cli.worker_cmd", "--shard", str(self.shard),
                "--shards", str(self.shards), "--broker", self.broker, "--bus", self.bus,
                "--data-dir", self.data_dir, "--heartbeat-ms", str(self.heartbeat_ms),
                "--liveness", str(self.liveness), "--log-level", self.log_level, *self.extra_args]


class Supervisor:
    def __init__(self, specs: list[WorkerSpec], on_exit: Callable[[int, int, int], None]) -> None:
        self.specs = specs
        self.on_exit = on_exit
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts: dict[int, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        for spec in self.specs:
            self._tasks.append(asyncio.create_task(self._keep(spec), name=f"worker-{spec.shard}"))

    def pids(self) -> dict[int, int]:
        return {k: p.pid for k, p in self.procs.items() if p.returncode is None}

    async def _keep(self, spec: WorkerSpec) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while not self._stopping:
            started = loop.time()
            env = dict(os.environ)
            proc = await asyncio.create_subprocess_exec(*spec.argv(), preexec_fn=_die_with_parent, env=env)
            self.procs[spec.shard] = proc
            log.info("started worker shard %d pid %d", spec.shard, proc.pid)
            code = await proc.wait()
            self.on_exit(spec.shard, proc.pid, code)
            if self._stopping:
                return
            self.restarts[spec.shard] = self.restarts.get(spec.shard, 0) + 1
            if loop.time() - started > 10:
                backoff = 0.1
            log.warning("worker shard %d pid %d exited with %s; restarting in %.1fs",
                        spec.shard, proc.pid, code, backoff)
            await asyncio.sleep(backoff)  # restart backoff (a real delay, not a test wait)
            backoff = min(backoff * 2, 5.0)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every worker; SIGKILL those still running after ``timeout``."""
        self._stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        waits = [p.wait() for p in self.procs.values() if p.returncode is None]
        if waits:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*waits)
            except TimeoutError:
                for proc in self.procs.values():
                    if proc.returncode is None:
                        log.warning("worker pid %d ignored SIGTERM; killing", proc.pid)
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                await asyncio.gather(*(p.wait() for p in self.procs.values()))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
