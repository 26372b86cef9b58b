"""The configuration of one shard worker, as the broker hands it over.

``zrpc-broker start`` builds one :class:`WorkerConfig` per shard from its own
options and passes it, serialized (:meth:`WorkerConfig.to_json`), to each
worker it spawns (``zrpc-worker --config JSON``); ``zrpc-worker`` started by
hand builds the same type from its options. Nothing travels through the
environment.

Some settings must agree across the hop; a worker announces them in READY
and the broker refuses a worker that disagrees (:func:`mismatch`), for good:
such a worker exits with the reason instead of registering again forever.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cluster.curve import check_endpoint
from zrpc import defaults
from zrpc.config import ServerConfig, StreamConfig

__all__ = ["DEFAULT_APP", "WorkerConfig", "mismatch"]

#: The app a worker serves unless told otherwise: the chat service.
DEFAULT_APP = "workers.app:chat_app"


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one shard worker needs (see module docstring)."""

    shard: int
    shards: int
    brokers: tuple[str, ...]
    bus: str
    data_dir: str
    #: History store URL (``sqlite:///path`` or ``postgresql://...``, ``{shard}`` replaced);
    #: "" means the SQLite file ``<data_dir>/shard-<k>.sqlite``.
    store: str = ""
    #: CurveZMQ key set for tcp:// links (``zrpc-broker keys create``); "" = plaintext.
    cluster_keys: str = ""
    #: Allow plaintext tcp:// links on non-loopback addresses.
    cluster_insecure: bool = False
    heartbeat_ms: int = defaults.HEARTBEAT_MS
    liveness: int = defaults.LIVENESS
    app: str = DEFAULT_APP
    log_level: str = defaults.LOG_LEVEL
    #: Largest message the worker accepts; at least the broker's ``--max-message-size``.
    max_message_size: int = defaults.MAX_MESSAGE_SIZE
    stream_window: int = defaults.STREAM_WINDOW
    max_buffered_messages: int = defaults.MAX_BUFFERED_MESSAGES
    #: Options of the app (the chat reads ``rate_per_s`` and ``rate_burst``).
    app_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"--shard must be in 0..{self.shards - 1}, got {self.shard}")
        if not self.brokers:
            raise ValueError("at least one --broker endpoint is required")
        if self.heartbeat_ms < 1 or self.liveness < 1:
            raise ValueError("--heartbeat-ms and --liveness must be positive")
        object.__setattr__(self, "brokers", tuple(self.brokers))
        has_keys = bool(self.cluster_keys)
        check_endpoint("--bus", self.bus, has_keys, self.cluster_insecure)
        for broker in self.brokers:
            check_endpoint("--broker", broker, has_keys, self.cluster_insecure)
        self.server  # noqa: B018  (validates the limits now, not at the first call)

    @property
    def server(self) -> ServerConfig:
        """The worker's side of its virtual connections: the broker's limits, no keepalive
        (the link's heartbeats cover liveness), an unbounded connection window (each
        broker-side stream is flow-controlled on its own)."""
        return ServerConfig(connection_window=2**31 - 1, keepalive_interval_ms=None,
                            max_message_size=self.max_message_size,
                            stream_config=StreamConfig(buffer_size=self.stream_window,
                                                       max_buffered_messages=self.max_buffered_messages))

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        """Parse :meth:`to_json` output; ValueError naming what is wrong."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"worker config is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("worker config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"worker config has unknown field(s): {', '.join(unknown)}")
        try:
            return cls(**{**data, "brokers": tuple(data.get("brokers") or ())})
        except TypeError as exc:
            raise ValueError(f"worker config: {exc}") from None

    @property
    def store_kind(self) -> str:
        """``"postgresql"`` for a shared store (workers take a shard lease), else ``"sqlite"``."""
        return "postgresql" if self.store.startswith(("postgresql://", "postgres://")) else "sqlite"

    def agreement(self) -> dict[str, int]:
        """What READY announces of the settings that must agree with the broker."""
        return {"heartbeat_ms": self.heartbeat_ms, "liveness": self.liveness,
                "max_message_size": self.max_message_size}


def mismatch(worker: dict[str, Any], *, heartbeat_ms: int, liveness: int,
             max_message_size: int) -> str | None:
    """Why a worker announcing ``worker`` (:meth:`WorkerConfig.agreement`) cannot serve a broker
    with these settings, or None. Workers that announce nothing (older ones) are not checked."""
    hb, live, size = worker.get("heartbeat_ms"), worker.get("liveness"), worker.get("max_message_size")
    if hb is not None and hb != heartbeat_ms:
        return (f"worker heartbeat is {hb} ms, this broker's is {heartbeat_ms} ms: "
                f"start the worker with --heartbeat-ms {heartbeat_ms}")
    if live is not None and live != liveness:
        return (f"worker liveness is {live}, this broker's is {liveness}: "
                f"start the worker with --liveness {liveness}")
    if size is not None and size < max_message_size:
        return (f"worker accepts messages up to {size} bytes, this broker up to {max_message_size}: "
                f"start the worker with --max-message-size {max_message_size}")
    return None
