"""Parsing of zrpc endpoint addresses: the one place that says what an address is.

Used by :meth:`zrpc.Client.connect`, the ``zrpc`` CLI's ``--server`` and the
broker's ``--listen``. Accepted forms::

    HOST:PORT          localhost:8443, 10.0.0.5:8443, chat.example.com:8443
    :PORT              the default host (``localhost`` for clients)
    PORT               likewise
    [V6]:PORT          [::1]:8443
    zrpc://HOST:PORT   the same as HOST:PORT (TLS over TCP)
    quic://HOST:PORT   the QUIC transport

Anything else (a missing port, a port outside 1..65535, ``https://``, a path,
user info, an unbracketed IPv6 address) raises :class:`AddressError`, a
``ValueError`` whose message is one line saying what is wrong and what is
accepted.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["DEFAULT_SCHEME", "SCHEMES", "Address", "AddressError", "Scheme", "parse_address", "parse_listen_address"]

Scheme = Literal["zrpc", "quic"]
#: The URL schemes an address may carry, and the one meant when it has none.
SCHEMES: Final[tuple[Scheme, ...]] = ("zrpc", "quic")
DEFAULT_SCHEME: Final[Scheme] = "zrpc"

_FORMS = "use HOST:PORT, :PORT, PORT, [IPv6]:PORT, zrpc://HOST:PORT or quic://HOST:PORT"
_HOST_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")
_WEB_SCHEMES = ("http", "https", "ws", "wss")
_DIGITS_RE = re.compile(r"^[0-9]+$")


class AddressError(ValueError):
    """An address that is not one of the accepted forms (the message says why)."""


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed endpoint: transport ``scheme``, ``host`` (no brackets) and ``port``."""

    scheme: Scheme
    host: str
    port: int

    @property
    def hostport(self) -> str:
        """``host:port``, with brackets around an IPv6 host."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.hostport if self.scheme == DEFAULT_SCHEME else f"{self.scheme}://{self.hostport}"


def parse_address(text: str, *, default_host: str = "localhost", allow_port_zero: bool = False) -> Address:
    """Parse ``text`` (see module docstring) or raise :class:`AddressError`.

    ``default_host`` fills in ``:PORT`` and ``PORT``. ``allow_port_zero`` is for
    listeners (port 0 asks the system for a free port).
    """
    if not isinstance(text, str):
        raise AddressError(f"address must be a string, got {type(text).__name__}")
    raw = text.strip()
    if not raw:
        raise AddressError(f"empty address: {_FORMS}")
    scheme: Scheme = DEFAULT_SCHEME
    rest = raw
    if "://" in raw:
        name, _, rest = raw.partition("://")
        name = name.lower()
        if name in _WEB_SCHEMES:
            raise AddressError(
                f"address {text!r}: {name}:// is the web page's scheme, not the RPC port's; {_FORMS}")
        if name not in SCHEMES:
            raise AddressError(f"address {text!r}: unknown scheme {name}://; {_FORMS}")
        scheme = name
        if rest.endswith("/"):
            rest = rest[:-1]
        if not rest:
            raise AddressError(f"address {text!r} has no host and port; {_FORMS}")
    for bad, what in (("/", "a path"), ("@", "user information"), ("?", "a query"), ("#", "a fragment")):
        if bad in rest:
            raise AddressError(f"address {text!r}: {what} is not allowed; {_FORMS}")
    host, port_text = _split(text, rest, default_host)
    return Address(scheme, host, _port(text, port_text, allow_port_zero))


def parse_listen_address(text: str) -> Address:
    """A listener's address: as :func:`parse_address`, default host ``127.0.0.1``, port 0 allowed."""
    return parse_address(text, default_host="127.0.0.1", allow_port_zero=True)


def _split(text: str, rest: str, default_host: str) -> tuple[str, str]:
    if rest.startswith("["):
        inside, sep, after = rest[1:].partition("]")
        if not sep:
            raise AddressError(f"address {text!r}: missing ']' after the IPv6 address; {_FORMS}")
        try:
            ipaddress.IPv6Address(inside.split("%", 1)[0])
        except ValueError:
            raise AddressError(f"address {text!r}: {inside!r} is not an IPv6 address; {_FORMS}") from None
        if not after.startswith(":"):
            raise AddressError(f"address {text!r} has no port; {_FORMS}")
        return inside, after[1:]
    if _DIGITS_RE.match(rest):
        return default_host, rest
    if rest.count(":") > 1:
        raise AddressError(f"address {text!r}: write an IPv6 address in brackets, e.g. [::1]:8443")
    host, sep, port = rest.partition(":")
    if not sep:
        raise AddressError(f"address {text!r} has no port; {_FORMS}")
    if not host:
        return default_host, port
    if not _HOST_RE.match(host) or ".." in host:
        raise AddressError(f"address {text!r}: {host!r} is not a host name or IP address; {_FORMS}")
    return host, port


def _port(text: str, port_text: str, allow_zero: bool) -> int:
    if not _DIGITS_RE.match(port_text):
        raise AddressError(f"address {text!r}: port {port_text!r} is not a number; {_FORMS}")
    low = 0 if allow_zero else 1
    port = int(port_text) if len(port_text) <= 5 else 65536
    if not low <= port <= 65535:
        raise AddressError(f"address {text!r}: port {port_text} is outside {low}..65535")
    return port
