"""No secret in any log line: :mod:`zrpc.redact` and a broker run with ``--debug-frames``."""

from __future__ import annotations

import logging
import pathlib

import pytest
import uvloop

import zrpc
from procs import start_broker
from zrpc.auth import mint_token
from zrpc.redact import REDACTED, RedactingFilter, redact

SECRET = "a-test-secret-of-32-bytes-length!"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZXN0ZXIifQ.c2lnbmF0dXJl"


@pytest.mark.parametrize(("text", "hidden"), [
    (f"recv HelloReceived(settings={{'version': 1, 'token': '{JWT}'}})", JWT),
    ("settings={'token': 'opaque-s3cret', 'user_agent': 'x'}", "opaque-s3cret"),
    ('{"password": "hunter2", "user": "u"}', "hunter2"),
    ("auth_secret=abcd1234 level=INFO", "abcd1234"),
    ("Authorization: Bearer abc.def-ghi", "abc.def-ghi"),
    (f"a bare {JWT} in text", JWT),
    ("ZRPC_TOKEN=xyz123 zrpc send", "xyz123"),
    ("settings={'token': b'raw-bytes-token'}", "raw-bytes-token"),
])
def test_secrets_are_redacted(text: str, hidden: str) -> None:
    clean = redact(text)
    assert hidden not in clean
    assert REDACTED in clean


@pytest.mark.parametrize("text", [
    "the token expired", "refused token for user bob", "max_token_age=30 tokens: 5 secrets",
    "broker listening on 127.0.0.1:8443 (TLS)", "",
])
def test_ordinary_text_is_untouched(text: str) -> None:
    assert redact(text) == text


def test_filter_redacts_arguments_and_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("zrpc.test.redact")
    handler = logging.Handler()
    records: list[str] = []
    handler.emit = lambda record: records.append(  # type: ignore[method-assign]
        record.getMessage() + (record.exc_text or ""))
    handler.addFilter(RedactingFilter())
    log.addHandler(handler)
    try:
        log.warning("hello %s", {"token": "sekret-1"})
        try:
            raise ValueError(f"bad token={JWT}")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    assert records and all("sekret-1" not in r and JWT not in r for r in records)
    assert REDACTED in records[0] and REDACTED in records[1]


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_debug_frames_never_logs_the_bearer_token(tmp_path: pathlib.Path) -> None:
    home = tmp_path / "home"
    broker = start_broker(home, "--auth-secret", SECRET, "--debug-frames", "--workers", "1", app=None)
    try:
        broker.wait_ready()
        token = mint_token(SECRET, "tester")

        async def call() -> object:
            async with zrpc.Client(zrpc.ClientConfig(token=token)) as client:
                await client.connect(broker.address, zrpc.TlsConfig.client(home))
                return await client.unary("Health/Check", {}, dict)

        assert uvloop.run(call()) == {"status": "SERVING"}
        output = broker.output()
        assert "HelloReceived" in output  # the frames were traced ...
        assert token not in output  # ... without the token
        assert token.split(".")[2] not in output
        assert REDACTED in output
    finally:
        broker.stop()
