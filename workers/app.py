"""What a worker serves: the chat service by default, or any ``module:function`` app.

An app factory takes the :class:`~workers.runtime.Worker` and returns an
object with ``services()``, ``replay()``, ``drain_activity()`` and ``close()``
(see :class:`~workers.runtime.App`). :class:`SimpleApp` wraps plain services
that publish nothing.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zrpc.service import Service

if TYPE_CHECKING:
    from workers.runtime import App, Worker

__all__ = ["SimpleApp", "chat_app", "load_app"]


class SimpleApp:
    """Services with no fan-out history."""

    def __init__(self, *services: Service) -> None:
        self._services = list(services)

    def services(self) -> list[Service]:
        return self._services

    def replay(self, topic: str, after_seq: int, upto_seq: int | None) -> list[tuple[int, bytes]] | None:
        return None

    def drain_activity(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        return None


def load_app(ref: str) -> Any:
    """Import ``module:function``."""
    module, _, name = ref.partition(":")
    if not module or not name:
        raise ValueError("expected module:function")
    return getattr(importlib.import_module(module), name)


def chat_app(worker: Worker) -> App:
    """The chat service for this worker's shard, history in the configured store
    (default: the SQLite file ``<data_dir>/shard-<k>.sqlite``)."""
    from workers.chat.service import ChatConfig, ChatService
    from zrpc.chat import CHAT, ChatResponse

    cfg = worker.config

    async def forward(message: Any) -> Any:
        client = await worker.client()
        return await client.unary(CHAT.methods["Chat/SendMessage"].name, message, ChatResponse)

    store = (cfg.store or str(Path(cfg.data_dir) / "shard-{shard}.sqlite")).replace(
        "{shard}", str(cfg.shard))
    # --chat-rate-per-s / --chat-rate-burst (zrpc-broker or zrpc-worker) and
    # --chat-presence-names-per-connection / -per-ip (zrpc-broker)
    limits = {k: v for k, v in cfg.app_options.items() if k in (
        "rate_per_s", "rate_burst", "max_presence_names_per_connection", "max_presence_names_per_ip")}
    return ChatService(ChatConfig(store_url=store, store_fence=worker.fence, **limits), bus=worker.bus,
                       owns=worker.owns, forward=forward)
