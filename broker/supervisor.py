"""Spawns and restarts the broker's shard workers (``zrpc-worker`` processes).

Each worker gets its :class:`~cluster.config.WorkerConfig` as one argument
(``zrpc-worker --shard N --config JSON``) and is started through the ``zrpc-worker``
entry point when it is installed next to the interpreter (so ``pgrep -f
zrpc-worker`` finds it), with ``PR_SET_PDEATHSIG`` (Linux) so it dies with
the broker even if the broker is SIGKILLed. A worker that exits is reported
at once (``on_exit``) and restarted with exponential backoff
(:class:`~zrpc.backoff.Backoff`: 0.1 s doubling to 5 s, reset after it stayed
up for 10 s).

A worker that fails the same way at start-up (same exit status, before it
registered) :data:`GIVE_UP_AFTER` times in a row cannot heal by restarting
(a bad ``--app``, a refused setting): the supervisor stops and calls
``on_give_up`` with the reason, the last line the worker wrote to stderr.
A hung worker (silent past its liveness and a grace, see
:meth:`broker.broker.Broker`) gets SIGTERM, then SIGKILL after
:data:`KILL_GRACE_S` (:meth:`Supervisor.kill_hung`), and is restarted like
any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from cluster.config import WorkerConfig
from zrpc.backoff import Backoff

__all__ = ["GIVE_UP_AFTER", "KILL_GRACE_S", "Supervisor", "worker_argv"]

log = logging.getLogger("zrpc.broker.supervisor")

#: Identical start-up failures in a row after which a worker is not restarted again.
GIVE_UP_AFTER = 5
#: Seconds a hung worker gets between SIGTERM and SIGKILL.
KILL_GRACE_S = 1.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def worker_argv(config: WorkerConfig) -> list[str]:
    """``zrpc-worker --shard N --config JSON``: the installed entry point, else the module
    under that name (``--shard`` only labels the process for ``ps``)."""
    args = ["--shard", str(config.shard), "--config", config.to_json()]
    script = Path(sys.executable).parent / "zrpc-worker"
    if script.is_file():
        return [sys.executable, str(script), *args]
    return [sys.executable, "-c", "from cli.worker_cmd import main; main(prog_name='zrpc-worker')", *args]


class Supervisor:
    """Keeps one process per :class:`WorkerConfig` running (see module docstring)."""

    def __init__(self, configs: list[WorkerConfig], on_exit: Callable[[int, int, int], None],
                 on_give_up: Callable[[str], None] = lambda reason: None) -> None:
        self.configs = configs
        self.on_exit = on_exit
        self.on_give_up = on_give_up
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts: dict[int, int] = {}
        self.registered: set[int] = set()   # pids that registered with the broker
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        for cfg in self.configs:
            self._tasks.append(asyncio.create_task(self._keep(cfg), name=f"worker-{cfg.shard}"))

    def pids(self) -> dict[int, int]:
        return {k: p.pid for k, p in self.procs.items() if p.returncode is None}

    def worker_registered(self, pid: int) -> None:
        self.registered.add(pid)

    async def _keep(self, cfg: WorkerConfig) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(initial=0.1, maximum=5.0, jitter=0.0)
        attempt = 0
        failures: list[int] = []  # exit statuses of consecutive start-up failures
        while not self._stopping:
            started = loop.time()
            proc = await asyncio.create_subprocess_exec(*worker_argv(cfg), preexec_fn=_die_with_parent,
                                                        stderr=asyncio.subprocess.PIPE)
            self.procs[cfg.shard] = proc
            log.info("started worker shard %d pid %d", cfg.shard, proc.pid)
            last_line = await self._relay_stderr(proc)
            code = await proc.wait()
            self.on_exit(cfg.shard, proc.pid, code)
            if self._stopping:
                return
            registered = proc.pid in self.registered
            self.registered.discard(proc.pid)
            self.restarts[cfg.shard] = self.restarts.get(cfg.shard, 0) + 1
            failures = [] if registered or (failures and failures[-1] != code) else failures
            if not registered:
                failures.append(code)
            if len(failures) >= GIVE_UP_AFTER:
                reason = (f"worker for shard {cfg.shard} failed {len(failures)} times at start-up "
                          f"(exit status {code}): {last_line or 'no message'}")
                log.error("%s; not restarting it", reason)
                self.on_give_up(reason)
                return
            attempt = 1 if loop.time() - started > 10 else attempt + 1  # up 10 s: a fresh start
            delay = backoff.delay(attempt)
            log.warning("worker shard %d pid %d exited with %s; restarting in %.1fs",
                        cfg.shard, proc.pid, code, delay)
            await asyncio.sleep(delay)  # restart backoff (a real delay, not a test wait)

    @staticmethod
    async def _relay_stderr(proc: asyncio.subprocess.Process) -> str:
        """Copy the worker's stderr to ours line by line; the last non-empty line (its reason)."""
        last = ""
        assert proc.stderr is not None
        out = sys.stderr.buffer
        while True:
            try:
                line = await proc.stderr.readline()
            except ValueError:  # a line past the stream limit: pass the chunk on as is
                line = await proc.stderr.read(64 * 1024)
            if not line:
                return last
            with contextlib.suppress(OSError, ValueError):
                out.write(line)
                out.flush()
            text = line.decode("utf-8", "replace").strip()
            if text:
                last = text.split(" msg=", 1)[-1]

    async def kill_hung(self, pid: int) -> None:
        """SIGTERM a worker that stopped answering, SIGKILL it after the grace; it is restarted."""
        proc = next((p for p in self.procs.values() if p.pid == pid and p.returncode is None), None)
        if proc is None:
            return
        log.warning("worker pid %d stopped answering; terminating it", pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(KILL_GRACE_S):
                await proc.wait()
        except TimeoutError:
            log.warning("worker pid %d did not exit %.1fs after SIGTERM; killing it", pid, KILL_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

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
