"""Start real ``zrpc-broker`` / ``zrpc-worker`` processes for tests, and always stop them.

Each process runs in its own session (process group) so that stopping it
also stops the workers it spawned, even when the test failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even by SIGKILL or a pytest-timeout exit."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def eventually(predicate: Any, timeout: float = 10.0, what: str = "",
                     interval: float = 0.005) -> Any:
    """The async :func:`wait_for`: poll ``predicate`` (sync, or returning an awaitable) until it
    gives a truthy value, which is returned; fail after ``timeout`` seconds."""
    import asyncio
    import inspect

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def env_for(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["ZRPC_HOME"] = str(home)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


@dataclass
class Proc:
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=self.log.open("ab"),
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self) -> None:
        """SIGTERM the whole process group; SIGKILL what is left after 10 s."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class BrokerProc(Proc):
    ready_file: Path = field(default=Path())
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return str(self.info["address"])

    def wait_ready(self, timeout: float = 30.0) -> BrokerProc:
        def ready() -> bool:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise AssertionError(f"broker exited with {self.popen.returncode}:\n{self.output()}")
            return self.ready_file.exists()
        wait_for(ready, timeout, what="broker ready file")
        self.info = json.loads(self.ready_file.read_text())
        return self


def start_broker(home: Path, *args: str, app: str | None = "tests.apps.echo:app",
                 heartbeat_ms: int = 200, name: str = "broker",
                 env: dict[str, str] | None = None) -> BrokerProc:
    home.mkdir(parents=True, exist_ok=True)
    ready = home / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    argv = [str(BIN / "zrpc-broker"), "start", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
            "--heartbeat-ms", str(heartbeat_ms), "--data-dir", str(home / "data"), *args]
    if app:
        argv += ["--app", app]
    p = BrokerProc(argv, {**env_for(home), **(env or {})}, home / f"{name}.log", ready_file=ready)
    return p.start()  # type: ignore[return-value]


def start_worker(home: Path, *args: str, name: str = "worker") -> Proc:
    argv = [str(BIN / "zrpc-worker"), *args]
    return Proc(argv, env_for(home), home / f"{name}.log").start()


async def connect(broker: BrokerProc, home: Path, **cfg: Any) -> Any:
    """A zrpc.Client (``ClientConfig(**cfg)``) connected to ``broker``, trusting ``home``'s CA."""
    import zrpc

    os.environ["ZRPC_HOME"] = str(home)
    client = zrpc.Client(zrpc.ClientConfig(**cfg))
    await client.connect(broker.address)
    return client


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append(int(entry.name))
    return out
