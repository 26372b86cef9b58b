"""``zrpc-worker``: run one shard worker by hand (another host, another supervisor)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from cli.common import LOG_LEVELS, run_async, setup_logging, tune_gc
from workers.app import load_app
from workers.runtime import Worker, WorkerConfig

__all__ = ["main"]


def _default_bus(broker: str, shard: int) -> str:
    if broker.startswith("ipc://") and broker.endswith(".ipc"):
        return f"{broker.rsplit('/', 1)[0]}/bus-{shard}.ipc"
    raise click.UsageError("--bus is required when the broker endpoint is not ipc:// "
                           "(e.g. --bus tcp://0.0.0.0:7001)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--shard", type=int, required=True, envvar="ZRPC_SHARD", help="Shard this worker owns (0-based).")
@click.option("--shards", type=int, required=True, envvar="ZRPC_SHARDS", help="Total number of shards.")
@click.option("--broker", "brokers", multiple=True, required=True, envvar="ZRPC_BROKER",
              help="Broker ROUTER endpoint to connect to (ipc://... or tcp://host:port); repeat for several brokers.")
@click.option("--bus", default=None, envvar="ZRPC_BUS",
              help="Endpoint this worker's PUB socket binds for room events (default: next to an ipc:// broker).")
@click.option("--data-dir", type=click.Path(file_okay=False), required=True, envvar="ZRPC_DATA_DIR",
              help="Directory for this shard's SQLite history (shard-N.sqlite).")
@click.option("--heartbeat-ms", type=int, default=1000, show_default=True, envvar="ZRPC_HEARTBEAT_MS")
@click.option("--liveness", type=int, default=3, show_default=True, envvar="ZRPC_LIVENESS",
              help="Missed heartbeats before the broker is declared dead.")
@click.option("--app", "app_ref", default="workers.app:chat_app", show_default=True, envvar="ZRPC_APP",
              help="module:function building what this worker serves (given the Worker).")
@click.option("--log-level", type=LOG_LEVELS, default="INFO", show_default=True, envvar="ZRPC_LOG_LEVEL")
def main(shard: int, shards: int, brokers: tuple[str, ...], bus: str | None, data_dir: str,
         heartbeat_ms: int, liveness: int, app_ref: str, log_level: str) -> None:
    """Serve shard SHARD of SHARDS for the brokers at BROKER.

    Registers with each broker (READY), heartbeats, runs the chat service for
    the rooms whose stable hash falls on this shard, and publishes room events
    on its bus. SIGTERM/SIGINT stop it cleanly (streams ended, history flushed).
    """
    setup_logging(log_level, f"worker-{shard}")
    try:
        config = WorkerConfig(shard=shard, shards=shards, brokers=brokers,
                              bus=bus or _default_bus(brokers[0], shard), data_dir=data_dir,
                              heartbeat_ms=heartbeat_ms, liveness=liveness)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    try:
        factory = load_app(app_ref)
    except (ImportError, AttributeError, ValueError) as exc:
        raise click.UsageError(f"--app {app_ref}: {exc}") from None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Worker(config, factory).run(stop)

    tune_gc(young_threshold=20_000)
    run_async(run())


if __name__ == "__main__":
    main()
