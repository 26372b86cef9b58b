"""Every option and variable is in docs/operations.md, named by one rule, defaults from one module."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from cli.options import BEGIN, END, EXCEPTIONS, expected_envvar, option_rows, table
from zrpc import defaults
from zrpc.config import ClientConfig, ServerConfig, StreamConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def test_operations_md_lists_every_option_and_variable() -> None:
    text = DOC.read_text()
    section = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    assert section == table().strip(), (
        "docs/operations.md is out of date: run `python -m cli.options --write docs/operations.md`")


def test_variables_follow_one_naming_rule() -> None:
    seen = {}
    for path, option in option_rows():
        env = option.envvar
        if not env:
            continue
        assert isinstance(env, str)
        if (path, option.opts[0]) in EXCEPTIONS:
            continue
        assert env == expected_envvar(option), f"{path} {option.opts[0]}: {env}"
        seen[env] = path
    assert "ZRPC_MAX_MESSAGE_SIZE" in seen and "ZRPC_CA" in seen


def test_deprecated_variable_names_still_work_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from cli.broker_cmd import start

    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    monkeypatch.delenv("ZRPC_CA", raising=False)
    monkeypatch.setenv("ZRPC_TLS_CA", str(ca))
    ctx = start.make_context("start", [])
    assert ctx.params["ca"] == str(ca)
    assert "ZRPC_TLS_CA is deprecated" in capsys.readouterr().err
    monkeypatch.setenv("ZRPC_CA", str(ca))
    start.make_context("start", [])
    assert "deprecated" not in capsys.readouterr().err  # the new name wins, silently


def test_configs_and_options_share_the_defaults() -> None:
    from cli.broker_cmd import start
    from cli.worker_cmd import main as worker

    assert ServerConfig().max_message_size == ClientConfig().max_message_size == defaults.MAX_MESSAGE_SIZE
    assert StreamConfig().buffer_size == defaults.STREAM_WINDOW
    for cmd in (start, worker):
        opts = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
        assert opts["max_message_size"].default == defaults.MAX_MESSAGE_SIZE
        assert opts["stream_window"].default == defaults.STREAM_WINDOW
        assert opts["max_buffered_messages"].default == defaults.MAX_BUFFERED_MESSAGES
        assert opts["heartbeat_ms"].default == defaults.HEARTBEAT_MS


def test_js_client_defaults_match_the_python_ones() -> None:
    import re

    js = (Path(__file__).resolve().parent.parent / "zrpc" / "web" / "zrpc.js").read_text()
    block = js[js.index("export const DEFAULT_SETTINGS"):]
    block = block[:block.index("});")]
    found = {k: eval(v, {}) for k, v in re.findall(r"(\w+): ([0-9 *]+),", block)}
    assert found == {
        "max_message_size": defaults.MAX_MESSAGE_SIZE,
        "max_concurrent_streams": defaults.MAX_CONCURRENT_STREAMS,
        "initial_stream_window": defaults.STREAM_WINDOW,
        "initial_connection_window": defaults.CONNECTION_WINDOW,
        "max_metadata_size": defaults.MAX_METADATA_SIZE,
    }
