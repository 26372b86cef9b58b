"""Keeping secrets out of logs: bearer tokens, JWTs, passwords and keys.

:func:`redact` rewrites one text; :class:`RedactingFilter` applies it to every
record a logging handler emits (the servers' and the CLI's handlers install
it, so ``--debug-frames`` traces, error messages and exception texts never
carry a token). What is replaced, by ``<redacted>``:

* anything shaped like a JWT (``eyJ...``.``...``.``...``);
* the value after ``Bearer``;
* the value of a key named like a secret (``token``, ``secret``, ``password``,
  ``authorization``, ``api_key``, ``private_key``...) written as ``key=value``,
  ``key: value``, ``'key': 'value'`` or ``"key": "value"``.
"""

from __future__ import annotations

import logging
import re
from typing import Final

__all__ = ["REDACTED", "RedactingFilter", "redact"]

REDACTED: Final = "<redacted>"

_KEY = r"(?:[A-Za-z_]*(?:token|secret|password|passwd|authorization|api_?key|private_?key|credential)s?)"
_QUOTED = re.compile(
    r"(?P<key>(?P<kq>['\"]?)" + _KEY + r"(?P=kq)\s*[:=]\s*b?)(?P<q>['\"])(?P<value>(?:\\.|(?!(?P=q)).)*)(?P=q)",
    re.IGNORECASE)
_BARE = re.compile(r"(?P<key>\b" + _KEY + r"\s*[=:]\s*)(?!(?:Bearer|Basic)\s|[0-9.]+\b)(?P<value>[^\s'\",;)}\]]+)",
                   re.IGNORECASE)
_BEARER = re.compile(r"(?P<key>\bBearer\s+)(?P<value>[A-Za-z0-9._~+/=-]+)", re.IGNORECASE)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """``text`` with every secret replaced by ``<redacted>`` (see module docstring)."""
    if not text:
        return text
    text = _JWT.sub(REDACTED, text)
    text = _QUOTED.sub(lambda m: f"{m['key']}{m['q']}{REDACTED}{m['q']}", text)
    text = _BEARER.sub(lambda m: m["key"] + REDACTED, text)
    return _BARE.sub(lambda m: m["key"] + REDACTED, text)


class RedactingFilter(logging.Filter):
    """A handler filter: the formatted message and exception text go through :func:`redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format: leave it to the handler to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
