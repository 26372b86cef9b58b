"""The broker's runtime directory (its ``ipc://`` endpoints), and cleaning up after dead brokers.

A broker without ``--runtime-dir`` makes a fresh ``zrpc-*`` directory under
``$XDG_RUNTIME_DIR`` (else the system temporary directory) and removes it when
it stops. A SIGKILLed broker cannot; the next broker to start removes such
leftovers: ``zrpc-*`` directories of this user whose ``broker.ipc`` socket no
longer accepts connections (nobody listens), or that never got one and are
older than a minute.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["make_runtime_dir", "remove_stale"]

log = logging.getLogger("zrpc.broker")
PREFIX = "zrpc-"
ENDPOINT = "broker.ipc"


def _base() -> str | None:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return base if base and os.path.isdir(base) else None


def make_runtime_dir() -> str:
    """A fresh private directory, after removing the stale ones next to it."""
    base = _base()
    remove_stale(Path(base or tempfile.gettempdir()))
    return tempfile.mkdtemp(prefix=PREFIX, dir=base)


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError as exc:
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
        return True


def remove_stale(base: Path, *, min_age_s: float = 60.0) -> list[Path]:
    """Remove the ``zrpc-*`` directories under ``base`` left by dead brokers; return them."""
    removed: list[Path] = []
    uid = os.getuid()
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    now = time.time()
    for d in entries:
        try:
            if not d.name.startswith(PREFIX) or not d.is_dir() or d.is_symlink() or d.stat().st_uid != uid:
                continue
            endpoint = d / ENDPOINT
            if endpoint.exists():
                stale = not _listening(endpoint)
            else:
                stale = now - d.stat().st_mtime > min_age_s
        except OSError:
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        log.info("removed %d runtime director%s of stopped brokers: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", ", ".join(map(str, removed)))
    return removed
