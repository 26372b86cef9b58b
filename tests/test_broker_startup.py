"""``zrpc-broker start`` refuses what cannot work with one line naming the option.

A real ``zrpc-broker`` process per case (``--workers 0``, so nothing else is
spawned); a port held by the test makes the bind fail.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import BIN, env_for

pytestmark = [pytest.mark.multiprocess]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield int(s.getsockname()[1])


def start(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "zrpc-broker"), "start", "--workers", "0", "--shards", "1", *args]
    return subprocess.run(argv, env=env_for(tmp_path / "home"), capture_output=True, text=True,
                          timeout=45)


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode not in (0, None), result
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(("option", "what"), [
    ("--listen", "127.0.0.1:{port}"),
    ("--metrics-port", "{port}"),
    ("--web-port", "{port}"),
])
def test_port_in_use_is_one_line(tmp_path: Path, busy_port: int, option: str, what: str) -> None:
    args = [option, what.format(port=busy_port)]
    if option != "--listen":
        args += ["--listen", "127.0.0.1:0"]
    result = start(tmp_path, *args)
    assert result.returncode == 1
    one_line_error(result, option, str(busy_port), "in use")


def test_missing_certificate_file_is_one_line(tmp_path: Path) -> None:
    result = start(tmp_path, "--listen", "127.0.0.1:0", "--cert", str(tmp_path / "nope.pem"),
                   "--key", str(tmp_path / "nope.key"))
    assert result.returncode == 2
    one_line_error(result, "--cert", "does not exist")


def test_unusable_certificate_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    result = start(tmp_path, "--listen", "127.0.0.1:0", "--cert", str(bad), "--key", str(bad))
    assert result.returncode == 1
    one_line_error(result, "--cert", str(bad))


@pytest.mark.parametrize("listen", ["localhost", "127.0.0.1:70000", "https://127.0.0.1:1"])
def test_bad_listen_address_is_a_usage_error(tmp_path: Path, listen: str) -> None:
    result = start(tmp_path, "--listen", listen)
    assert result.returncode == 2
    one_line_error(result, "--listen")
