"""A throwaway PostgreSQL server for tests and the bench, in a temporary directory.

The Debian server package (``apt-get install postgresql``, which ``scripts/test``
installs where missing) provides the binaries under
``/usr/lib/postgresql/<version>/bin``.  PostgreSQL refuses to run as root, so
as root the server runs as the ``postgres`` user.  It listens on a free TCP
port on ``host`` (127.0.0.1 by default) with ``trust`` authentication, fsync
off unless asked for (tests check the commit protocol, not the disk; the
bench keeps fsync on), and is always stopped by :meth:`PostgresServer.stop`.
``initdb`` creates the cluster; the postmaster then runs in the foreground as
this process's child with a parent-death signal (``setpriv --pdeathsig`` as
root), so it also stops when the test run is killed (a pytest-timeout exit),
and ``pg_ctl stop`` stops it otherwise.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostgresServer", "find_bindir", "missing_reason", "require_postgres"]


def find_bindir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory, if any."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if os.access(os.path.join(d, "pg_ctl"), os.X_OK) and os.access(os.path.join(d, "initdb"), os.X_OK):
            return Path(d)
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    return None


def missing_reason() -> str | None:
    """Why no server can be started here, or None."""
    if find_bindir() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl) not found; "
                "scripts/test installs them (apt-get install postgresql)")
    if os.geteuid() == 0 and not _has_user("postgres"):
        return "running as root but there is no postgres user to run the server as"
    return None


def require_postgres() -> Path:
    """For a test: the bin directory, else skip (fail under CI=true, where it must be there)."""
    import pytest

    why = missing_reason()
    bindir = find_bindir()
    if why is not None or bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail(why or "no PostgreSQL")
        pytest.skip(why or "no PostgreSQL")
    return bindir


def _die_with_parent() -> None:
    """In the child: SIGQUIT (PostgreSQL's immediate shutdown) when the parent dies."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGQUIT)  # PR_SET_PDEATHSIG


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory (see the module docstring)."""

    def __init__(self, bindir: Path, host: str = "127.0.0.1", *, fsync: bool = False,
                 also_listen: tuple[str, ...] = ()) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.host = host
        self.also_listen = also_listen  # more addresses (a test's network namespaces reach these)
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="zrpc-pg-"))
        self.data = self.dir / "data"
        self._user: str | None = "postgres" if os.geteuid() == 0 else None
        self._started = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._dbs = 0

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=str(self.dir))

    def start(self) -> PostgresServer:
        if self._user is not None:
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, self._user)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        if self.also_listen:  # admit the /24 of each extra address (a test's namespaces)
            with (self.data / "pg_hba.conf").open("a") as hba:
                for addr in self.also_listen:
                    net = addr.rsplit(".", 1)[0] + ".0/24"
                    hba.write(f"host all all {net} trust\n")
        self.port = _free_port(self.host)
        listen = ",".join((self.host, *self.also_listen))
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses={listen} "
                f"-c fsync={'on' if self.fsync else 'off'} "
                "-c max_connections=200 -c shared_buffers=32MB")
        argv = [str(self.bindir / "postgres"), "-D", str(self.data), *opts.split()]
        if self._user is not None:  # setpriv execs postgres itself, keeping the death signal
            argv = ["setpriv", "--reuid", self._user, "--regid", self._user, "--init-groups",
                    "--pdeathsig", "SIGQUIT", *argv]
        self._proc = subprocess.Popen(argv, stdout=(self.dir / "log").open("ab"),
                                      stderr=subprocess.STDOUT, cwd=str(self.dir),
                                      preexec_fn=_die_with_parent)
        self._started = True
        deadline = time.monotonic() + 30
        while True:  # polling until the server accepts connections (or died)
            try:
                self._run("pg_isready", "-q", "-h", self.host, "-p", str(self.port), timeout=10)
                return self
            except subprocess.CalledProcessError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.log()[-2000:]}") from None
                time.sleep(0.05)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{db}"

    def new_database(self) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        self._dbs += 1
        name = f"t{self._dbs}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def log(self) -> str:
        try:
            return (self.dir / "log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            if self._started and self._proc is not None:
                try:  # immediate shutdown: a throwaway server
                    self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop",
                              timeout=30)
                except (subprocess.SubprocessError, OSError):
                    self._proc.send_signal(signal.SIGQUIT)
                try:
                    self._proc.wait(30)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(10)
        finally:
            self._started = False
            shutil.rmtree(self.dir, ignore_errors=True)
