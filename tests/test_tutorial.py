"""docs/streaming-tutorial.md cannot rot: its code is examples/, shown verbatim and run here."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import ROOT, BrokerProc, env_for, start_broker

DOC = ROOT / "docs" / "streaming-tutorial.md"
INCLUDE = re.compile(r"<!-- include: (examples/[\w.]+) -->\n```python\n(.*?)```\n", re.S)


def test_every_example_is_shown_verbatim() -> None:
    shown = dict(INCLUDE.findall(DOC.read_text()))
    assert set(shown) == {f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py")}
    for path, code in shown.items():
        assert code == (ROOT / path).read_text(), f"{path} differs from the tutorial"


def run_example(name: str, env: dict[str, str], *args: str, stdin: str = "") -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_own_service_example_runs_in_memory(tmp_path: Path) -> None:
    assert "all four patterns work" in run_example("own_service.py", env_for(tmp_path))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProc]:
    b = start_broker(tmp_path, app=None)
    try:
        yield b.wait_ready()
    finally:
        b.stop()


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_chat_examples_against_a_real_broker(broker: BrokerProc, tmp_path: Path) -> None:
    env = env_for(tmp_path)
    env["ZRPC_SERVER"] = broker.address
    out = run_example("batch_client.py", env)
    assert "5 messages, 67 characters" in out
    assert out.index("- alice") < out.index("- bob") < out.index("- charlie")

    out = run_example("send_message.py", env, "one", "more")
    assert "stored as #6 at" in out

    out = run_example("subscriber.py", env, "7")  # 6 messages replayed + its own join
    assert "[general] #1 alice: Hello everyone!" in out and "#6 alice: one more" in out
    assert "subscriber joined the room" in out and "Received 7 events" in out

    out = run_example("chat_client.py", env, "dora", "general", stdin="hi there\nquit\n")
    assert "(sent #7)" in out and "Chat session ended!" in out
