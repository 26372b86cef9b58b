"""The transport-adapter interface: what a zrpc connection needs from its carrier.

Every zrpc endpoint runs the same session layer (the sans-IO
:class:`~zrpc.protocol.Connection` plus the asyncio glue of
:mod:`zrpc.session`), owned by an ``asyncio.Protocol``: the client's
(``zrpc.client``), the in-process server's (``zrpc.server``) and the broker
edge's (``broker.edge.EdgeProtocol``). That protocol is handed a
:class:`Transport` in ``connection_made`` and fed the peer's zrpc frames with
``data_received``; it writes frames with ``Transport.write``. The adapters
differ only in how those bytes travel:

=============  ===============================================================
TLS over TCP   asyncio's own transport (``create_server``/``create_connection``
               with an ``ssl`` context); the default, ``host:port``
QUIC           :class:`zrpc.quic.QuicPipe`: frames cut per QUIC stream by
               :class:`zrpc.protocol.quic.StreamMux` (``quic://host:port``)
WebSocket      ``broker.web``: binary WebSocket messages (browsers)
in memory      :func:`zrpc.testing.connect_in_memory`: the two sessions wired
               to each other's ``data_received`` (no sockets, no protocol)
=============  ===============================================================
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Transport"]


@runtime_checkable
class Transport(Protocol):
    """The part of ``asyncio.Transport`` a zrpc protocol uses."""

    def write(self, data: bytes) -> None:
        """Send zrpc frames (whole frames, as ``Connection.data_to_send()`` returns them)."""

    def close(self) -> None:
        """Send what is queued, then close."""

    def abort(self) -> None:
        """Close now."""

    def is_closing(self) -> bool:
        """True once closed or closing."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``"peername"`` (the client's address: connection limits per IP) and
        ``"ssl_object"`` (the verified client certificate's identity, TLS only)."""
