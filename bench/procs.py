"""Process handling for the orchestrator: every server and load generator is its own process.

Each child runs in its own session (process group) with PR_SET_PDEATHSIG, so
stopping a group also stops what it spawned (the broker's workers), and a
child dies if the orchestrator is killed. :meth:`ProcSet.stop_all` runs on
every exit path (``finally``, SIGTERM/SIGINT, atexit).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import ROOT, die_with_parent, parse_result

PY = sys.executable
BIN = Path(sys.executable).parent


class BenchError(RuntimeError):
    pass


class ProcSet:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.live: list[subprocess.Popen[bytes]] = []
        self._n = 0
        atexit.register(self.stop_all)

    # ---------------------------------------------------------------- spawn
    def spawn(self, argv: list[str], name: str, *, stdout: Any = None) -> subprocess.Popen[bytes]:
        self._n += 1
        log = (self.workdir / f"{self._n:03d}-{name}.log").open("ab")
        p = subprocess.Popen(argv, env=self.env, cwd=str(ROOT), stdin=subprocess.DEVNULL,
                             stdout=stdout if stdout is not None else log,
                             stderr=log if stdout is not None else subprocess.STDOUT,
                             start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        p.name = name  # type: ignore[attr-defined]
        p.log = self.workdir / f"{self._n:03d}-{name}.log"  # type: ignore[attr-defined]
        self.live.append(p)
        return p

    def log_tail(self, p: subprocess.Popen[bytes], n: int = 2000) -> str:
        try:
            return Path(p.log).read_text(errors="replace")[-n:]  # type: ignore[attr-defined]
        except OSError:
            return ""

    def wait_ready(self, p: subprocess.Popen[bytes], ready: Path, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if p.poll() is not None:
                raise BenchError(f"{p.name} exited with {p.returncode}:\n{self.log_tail(p)}")  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                raise BenchError(f"{p.name} not ready after {timeout:g}s:\n{self.log_tail(p)}")  # type: ignore[attr-defined]
            time.sleep(0.02)
        return dict(json.loads(ready.read_text()))

    # ------------------------------------------------------------- servers
    @contextlib.contextmanager
    def server(self, kind: str, *, app: str | None = None, workers: int = 2,
               extra: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
        """Start a server (``zrpc``, ``zrpc-broker``, ``grpc``, ``grpc-uvloop``, ``bare``, ``zmq``); stop it on exit."""
        self._n += 1
        ready = self.workdir / f"ready-{self._n}-{kind}.json"
        if kind == "zrpc-broker":
            data = self.workdir / f"data-{self._n}"
            argv = [str(BIN / "zrpc-broker"), "start", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
                    "--workers", str(workers), "--data-dir", str(data), "--log-level", "WARNING",
                    *self.broker_limits(), *extra]
            if app:
                argv += ["--app", app]
        elif kind == "grpc-uvloop":
            argv = [PY, "-m", "bench.servers", "grpc", "--loop", "uvloop", "--ready-file", str(ready)]
        elif kind == "zmq":
            argv = [PY, "-m", "bench.servers", "zmq", "--ready-file", str(ready),
                    "--endpoint", f"ipc://{self.workdir}/zmq-echo-{self._n}.ipc"]
        else:
            argv = [PY, "-m", "bench.servers", kind, "--ready-file", str(ready)]
        p = self.spawn(argv, f"server-{kind}")
        try:
            info = self.wait_ready(p, ready)
            info["kind"] = kind
            info["popen"] = p
            yield info
        finally:
            self.stop(p)

    _broker_help: str | None = None

    def broker_limits(self) -> list[str]:
        """Lift the broker's admission limits that a loopback benchmark trips (only those it has).

        All load comes from 127.0.0.1, so the per-IP cap would refuse the idle
        scenario's connections; per-user chat rate limits would cap scenario 7
        below the capacity being measured.
        """
        if ProcSet._broker_help is None:
            try:
                ProcSet._broker_help = subprocess.run(
                    [str(BIN / "zrpc-broker"), "start", "--help"], env=self.env, capture_output=True,
                    text=True, timeout=60).stdout
            except (OSError, subprocess.TimeoutExpired):
                ProcSet._broker_help = ""
        wanted = [("--max-connections", "20000"), ("--max-connections-per-ip", "20000"),
                  ("--chat-rate-per-s", "0"), ("--idle-timeout-ms", "0")]
        out: list[str] = []
        for opt, value in wanted:
            if f"{opt} " in ProcSet._broker_help:
                out += [opt, value]
        return out

    # --------------------------------------------------------------- loads
    def load_argv(self, spec: dict[str, Any]) -> list[str]:
        return [PY, "-m", "bench.load", json.dumps(spec)]

    def start_load(self, spec: dict[str, Any], name: str) -> subprocess.Popen[bytes]:
        return self.spawn(self.load_argv(spec), f"load-{name}", stdout=subprocess.PIPE)

    def finish_load(self, p: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p)
            raise BenchError(f"{p.name} did not finish within {timeout:.0f}s:\n{self.log_tail(p)}") from None  # type: ignore[attr-defined]
        finally:
            if p in self.live and p.poll() is not None:
                self.live.remove(p)
        if p.returncode != 0:
            raise BenchError(f"{p.name} exited with {p.returncode}:\n{self.log_tail(p)}")  # type: ignore[attr-defined]
        try:
            return parse_result(out.decode(errors="replace"))
        except (RuntimeError, ValueError) as exc:
            raise BenchError(f"{p.name}: {exc}\n{self.log_tail(p)}") from None  # type: ignore[attr-defined]

    def load(self, spec: dict[str, Any], name: str, timeout: float) -> dict[str, Any]:
        return self.finish_load(self.start_load(spec, name), timeout)

    # ---------------------------------------------------------------- stop
    def stop(self, p: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)
        if p in self.live:
            self.live.remove(p)

    def stop_all(self) -> None:
        for p in list(self.live):
            self.stop(p, grace=2.0)
