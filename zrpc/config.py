"""Frozen configuration dataclasses for servers, clients and streams.

Names follow the streaming tutorial (docs/streaming-tutorial.md: ``ServerConfig``, ``ClientConfig``,
``StreamConfig``); every field has a sensible default.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from zrpc import defaults
from zrpc.protocol.connection import Settings

if TYPE_CHECKING:
    from zrpc.context import RequestContext

__all__ = ["ClientConfig", "Interceptor", "ServerConfig", "StreamConfig"]

#: ``async def interceptor(context) -> None``; raise :class:`zrpc.RpcError` to refuse the call.
Interceptor = Callable[["RequestContext"], Awaitable[None]]


@dataclass(frozen=True)
class StreamConfig:
    """Per-stream buffering and compression (the tutorial's ``StreamConfig``).

    ``buffer_size`` is the receive window a stream announces (bytes the peer may
    send before we return credit); ``max_buffered_messages`` bounds the queue of
    broadcast events waiting for credit on an attached stream, and
    ``max_buffered_bytes`` their size (past either the stream ends with
    RESOURCE_EXHAUSTED and the client resumes).
    """

    buffer_size: int = defaults.STREAM_WINDOW
    max_buffered_messages: int = defaults.MAX_BUFFERED_MESSAGES
    max_buffered_bytes: int = defaults.MAX_BUFFERED_BYTES
    enable_compression: bool = False
    compression_threshold: int = defaults.COMPRESSION_THRESHOLD

    def __post_init__(self) -> None:
        if self.buffer_size < 1024:
            raise ValueError("StreamConfig.buffer_size must be at least 1024 bytes")
        if self.max_buffered_messages < 1 or self.max_buffered_bytes < 1:
            raise ValueError("StreamConfig.max_buffered_messages and max_buffered_bytes must be positive")

    @property
    def threshold(self) -> int | None:
        return self.compression_threshold if self.enable_compression else None


@dataclass(frozen=True)
class ServerConfig:
    """In-process server (and broker edge) limits."""

    max_connections: int = defaults.MAX_CONNECTIONS
    max_connections_per_ip: int = defaults.MAX_CONNECTIONS_PER_IP  # past it: GOAWAY RESOURCE_EXHAUSTED before HELLO
    idle_timeout_ms: int | None = defaults.IDLE_TIMEOUT_MS  # close connections with no stream this long (None: off)
    request_timeout_ms: int | None = None     # default deadline for calls that send none
    enable_debug_logging: bool = False         # trace every frame at DEBUG level
    max_concurrent_streams: int = defaults.MAX_CONCURRENT_STREAMS
    max_message_size: int = defaults.MAX_MESSAGE_SIZE
    connection_window: int = defaults.CONNECTION_WINDOW
    max_metadata_size: int = defaults.MAX_METADATA_SIZE
    keepalive_interval_ms: int | None = defaults.KEEPALIVE_INTERVAL_MS
    keepalive_timeout_ms: int = defaults.KEEPALIVE_TIMEOUT_MS
    handshake_timeout_ms: int = defaults.HANDSHAKE_TIMEOUT_MS  # TLS + HELLO must complete within this
    shutdown_grace_ms: int = defaults.SHUTDOWN_GRACE_MS  # in-flight calls get this long after GOAWAY
    max_connection_buffer: int = defaults.MAX_CONNECTION_BUFFER  # bytes waiting for one client
    max_buffer_memory: int = defaults.MAX_BUFFER_MEMORY  # for all clients (the biggest goes past it)
    stream_config: StreamConfig = field(default_factory=StreamConfig)
    interceptors: Sequence[Interceptor] = ()
    authenticator: Callable[[dict[str, Any], Any], Any] | None = None  # (hello, peer) -> identity

    def settings(self) -> Settings:
        return Settings(
            max_message_size=self.max_message_size,
            max_concurrent_streams=self.max_concurrent_streams,
            initial_stream_window=self.stream_config.buffer_size,
            initial_connection_window=self.connection_window,
            max_metadata_size=self.max_metadata_size,
            keepalive_interval_ms=self.keepalive_interval_ms,
            keepalive_timeout_ms=self.keepalive_timeout_ms,
        )


@dataclass(frozen=True)
class ClientConfig:
    """Client defaults (the tutorial's ``ClientConfig``)."""

    request_timeout_ms: int | None = defaults.REQUEST_TIMEOUT_MS  # unary / client-streaming deadline
    stream_timeout_ms: int | None = None       # default deadline of server-streaming / bidi calls
    connect_timeout_ms: int = defaults.CONNECT_TIMEOUT_MS
    max_message_size: int = defaults.MAX_MESSAGE_SIZE
    connection_window: int = defaults.CONNECTION_WINDOW
    keepalive_interval_ms: int | None = defaults.KEEPALIVE_INTERVAL_MS
    keepalive_timeout_ms: int = defaults.KEEPALIVE_TIMEOUT_MS
    token: str | None = None                   # bearer token sent in HELLO
    user_agent: str = "zrpc-python"
    stream_config: StreamConfig = field(default_factory=StreamConfig)
    #: The transport adapter for addresses without a scheme: "tls" (TLS over TCP) or "quic".
    #: An address's own ``zrpc://`` or ``quic://`` always wins.
    transport: Literal["tls", "quic"] = "tls"

    def __post_init__(self) -> None:
        if self.transport not in ("tls", "quic"):
            raise ValueError(f"ClientConfig.transport must be 'tls' or 'quic', got {self.transport!r}")

    def settings(self) -> Settings:
        return Settings(
            max_message_size=self.max_message_size,
            initial_stream_window=self.stream_config.buffer_size,
            initial_connection_window=self.connection_window,
            keepalive_interval_ms=self.keepalive_interval_ms,
            keepalive_timeout_ms=self.keepalive_timeout_ms,
        )
