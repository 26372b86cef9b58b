"""The JavaScript client (zrpc/web/zrpc.js): its Node unit tests, and the same client against a real broker.

``node --test zrpc/web/test/`` runs the unit tests (the protocol doc's worked example byte for byte,
frames, flow control, the four call patterns against a scripted server). The second test starts
a broker with the echo app and ``--web-port 0`` and runs ``zrpc/web/test/live.test.js`` over both
transports: TLS to the main listener and a WebSocket to the web listener.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import ROOT, BrokerProc, env_for, start_broker

WEB = ROOT / "zrpc" / "web"
NODE = shutil.which("node")


def node_or_fail() -> str:
    if NODE is None:
        pytest.fail("node (Node.js >= 20) is required for the web client tests; scripts/test installs it")
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < 20:
        pytest.fail(f"Node.js >= 20 is required for the web client tests, found {version}")
    return NODE


def node_flags(node: str) -> list[str]:
    """Node 20 has WebSocket only behind a flag (Node >= 22: global)."""
    probe = subprocess.run([node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"], timeout=30)
    return [] if probe.returncode == 0 else ["--experimental-websocket"]


def run_node(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    node = node_or_fail()
    return subprocess.run([node, *node_flags(node), "--test", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_node_unit_tests() -> None:
    p = run_node(["zrpc/web/test/"])
    assert p.returncode == 0, f"node --test zrpc/web/test/ failed:\n{p.stdout[-8000:]}\n{p.stderr[-4000:]}"
    assert "# fail 0" in p.stdout and "# pass " in p.stdout


@pytest.fixture
def echo_broker(tmp_path: Path) -> Iterator[BrokerProc]:
    b = start_broker(tmp_path, "--web-port", "0")
    try:
        yield b.wait_ready()
    finally:
        b.stop()


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_js_client_against_a_real_broker(echo_broker: BrokerProc, tmp_path: Path) -> None:
    ca = tmp_path / "tls" / "dev-ca.crt"
    web_port = str(echo_broker.info["web"]).rsplit(":", 1)[1]
    env = env_for(tmp_path)
    env.update(ZRPC_TEST_TLS=echo_broker.address, ZRPC_TEST_WS=f"wss://localhost:{web_port}/zrpc",
               ZRPC_TEST_CA=str(ca), NODE_EXTRA_CA_CERTS=str(ca))
    env.pop("NODE_OPTIONS", None)
    p = run_node(["zrpc/web/test/live.test.js"], env)
    out = p.stdout
    assert p.returncode == 0, f"live JS tests failed:\n{out[-8000:]}\n{p.stderr[-4000:]}\n{echo_broker.output()[-4000:]}"
    assert "# skipped 0" in out and "# pass 6" in out, out[-2000:]
    assert os.path.exists(ca)
