"""Every default limit and timing in one place.

The config dataclasses (:mod:`zrpc.config`, :class:`zrpc.protocol.connection.Settings`,
:class:`cluster.config.WorkerConfig`, :class:`broker.broker.BrokerConfig`) and the
command-line options (``zrpc-broker``, ``zrpc-worker``) read their defaults from
here, so a default is changed once. ``docs/operations.md`` lists them in its
generated option table (``python -m cli.options --write docs/operations.md``).
"""

from __future__ import annotations

from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB

# ---------------------------------------------------------------- protocol
MAX_MESSAGE_SIZE: Final = 4 * MiB
MAX_CONCURRENT_STREAMS: Final = 1024
STREAM_WINDOW: Final = 256 * KiB
CONNECTION_WINDOW: Final = 4 * MiB
MAX_METADATA_SIZE: Final = 16 * KiB
KEEPALIVE_INTERVAL_MS: Final = 30_000
KEEPALIVE_TIMEOUT_MS: Final = 10_000
COMPRESSION_THRESHOLD: Final = 1024

# ------------------------------------------------------------------ server
MAX_BUFFERED_MESSAGES: Final = 4096          # fan-out events queued per slow stream
MAX_BUFFERED_BYTES: Final = 4 * MiB           # their bytes
MAX_CONNECTION_BUFFER: Final = 16 * MiB       # bytes waiting for one client
MAX_BUFFER_MEMORY: Final = 128 * MiB          # bytes waiting for all clients of a process
MAX_CONNECTIONS: Final = 10_000
MAX_CONNECTIONS_PER_IP: Final = 1000
IDLE_TIMEOUT_MS: Final = 600_000
HANDSHAKE_TIMEOUT_MS: Final = 10_000
SHUTDOWN_GRACE_MS: Final = 10_000

# ------------------------------------------------------------------ client
REQUEST_TIMEOUT_MS: Final = 30_000
CONNECT_TIMEOUT_MS: Final = 10_000

# -------------------------------------------------------- broker / workers
LISTEN: Final = "127.0.0.1:8443"
WORKERS: Final = 2
HEARTBEAT_MS: Final = 1000
LIVENESS: Final = 3
LOCAL_LINK: Final = "unix"                   # spawned workers' link to their broker ("unix" or "zmq")
LOG_LEVEL: Final = "INFO"
