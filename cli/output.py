"""Output helpers of the ``zrpc`` client CLI: JSON lines, colour, times, errors.

Everything the commands print goes through :class:`Output` so that ``--json``
(one JSON object per line on stdout) and the human format stay consistent.
Colour is used only when stdout is a terminal. Errors always go to stderr as
``error: STATUS_NAME: message``.

Bytes in JSON: valid UTF-8 is printed as a string, anything else as
``{"$base64": "..."}`` (and :func:`from_json` turns that marker back into bytes,
so ``zrpc call`` round-trips binary fields).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import enum
import json as _json
import sys
from typing import IO, Any

import click

from zrpc.codec import to_wire
from zrpc.status import RpcError

__all__ = ["BASE64_KEY", "Output", "format_time", "from_json", "jsonable"]

#: The marker of a binary value in JSON output/input.
BASE64_KEY = "$base64"


def jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of a message (dataclass), a plain msgpack value, or bytes."""
    value = to_wire(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {BASE64_KEY: base64.b64encode(raw).decode("ascii")}
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, dict):
        return {k if isinstance(k, str) else _json.dumps(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    """Inverse of :func:`jsonable` for input: ``{"$base64": s}`` becomes bytes."""
    if isinstance(value, dict):
        if len(value) == 1 and BASE64_KEY in value and isinstance(value[BASE64_KEY], str):
            try:
                return base64.b64decode(value[BASE64_KEY], validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"invalid base64 in {BASE64_KEY!r}") from None
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def format_time(ms: int | float | None, *, date: bool = False) -> str:
    """Epoch milliseconds as local ``HH:MM:SS`` (with the date when asked)."""
    if not ms:
        return "--:--:--"
    try:
        t = datetime.datetime.fromtimestamp(ms / 1000)
    except (OverflowError, OSError, ValueError):
        return str(ms)
    return t.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")


class Output:
    """Where and how a command prints (see module docstring)."""

    def __init__(self, json_mode: bool = False, color: bool | None = None,
                 stream: IO[str] | None = None) -> None:
        self.json_mode = json_mode
        self._stream = stream
        self.color = _isatty(self.stream) if color is None else color

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stdout

    # ------------------------------------------------------------ stdout
    def json(self, obj: Any) -> None:
        """One JSON object on one line."""
        click.echo(_json.dumps(jsonable(obj), ensure_ascii=False, separators=(",", ":")),
                   file=self._stream, color=False)

    def line(self, text: str = "") -> None:
        click.echo(text, file=self._stream, color=self.color)

    def style(self, text: str, **styles: Any) -> str:
        """``click.style`` when colour is on, the plain text otherwise."""
        return click.style(text, **styles) if self.color else text

    # ------------------------------------------------------------ stderr
    @staticmethod
    def info(text: str) -> None:
        click.echo(text, err=True)

    @staticmethod
    def error(exc: RpcError | str, status: str | None = None) -> None:
        if isinstance(exc, RpcError):
            status, message = exc.status.name, exc.message
        else:
            message = exc
        err_color = _isatty(sys.stderr)
        prefix = click.style("error:", fg="red", bold=True) if err_color else "error:"
        text = f"{prefix} {status}: {message}" if status else f"{prefix} {message}"
        click.echo(text, err=True, color=err_color)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
