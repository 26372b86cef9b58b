"""``zrpc-worker``: run one shard worker by hand (another host, another supervisor)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import click

from cli.common import LOG_LEVELS, check_store_url, run_async, setup_logging, tune_gc
from cluster.config import DEFAULT_APP, WorkerConfig
from cluster.curve import ClusterKeys
from workers.app import load_app
from workers.runtime import LeaseLost, serve
from zrpc import defaults

__all__ = ["EX_CONFIG", "EX_TEMPFAIL", "main"]

#: Exit status of a worker whose configuration can never work (sysexits.h EX_CONFIG).
EX_CONFIG = 78
#: Exit status of a worker that lost its shard lease to another worker (sysexits.h EX_TEMPFAIL).
EX_TEMPFAIL = 75


def _default_bus(broker: str, shard: int) -> str:
    if broker.startswith("ipc://") and broker.endswith(".ipc"):
        return f"{broker.rsplit('/', 1)[0]}/bus-{shard}.ipc"
    raise click.UsageError("--bus is required when the broker endpoint is not ipc:// "
                           "(e.g. --bus tcp://0.0.0.0:7001)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_json", default=None, metavar="JSON",
              help="The whole configuration as JSON (how zrpc-broker starts its workers); "
                   "no other option but a matching --shard may be given with it.")
@click.option("--shard", type=int, default=None, envvar="ZRPC_SHARD", help="Shard this worker owns (0-based).")
@click.option("--shards", type=int, default=None, envvar="ZRPC_SHARDS", help="Total number of shards.")
@click.option("--broker", "brokers", multiple=True, envvar="ZRPC_BROKER",
              help="Broker ROUTER endpoint to connect to (ipc://... or tcp://host:port); repeat for several brokers.")
@click.option("--bus", default=None, envvar="ZRPC_BUS",
              help="Endpoint this worker's PUB socket binds for room events (default: next to an ipc:// broker).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, envvar="ZRPC_DATA_DIR",
              help="Directory for this shard's SQLite history (shard-N.sqlite); required without --store.")
@click.option("--store", default=None, envvar="ZRPC_STORE",
              help="History store URL: sqlite:///path/shard-{shard}.sqlite or "
                   "postgresql://user@host:port/db ({shard} is replaced by the shard number; "
                   "default: DATA_DIR/shard-N.sqlite).")
@click.option("--cluster-keys", type=click.Path(file_okay=False), default=None, envvar="ZRPC_CLUSTER_KEYS",
              help="CurveZMQ key set (from `zrpc-broker keys create DIR`): encrypt and authenticate "
                   "every tcp:// link between brokers and workers.")
@click.option("--cluster-insecure", is_flag=True, envvar="ZRPC_CLUSTER_INSECURE",
              help="Allow plaintext tcp:// cluster links on non-loopback addresses.")
@click.option("--heartbeat-ms", type=int, default=defaults.HEARTBEAT_MS, show_default=True, envvar="ZRPC_HEARTBEAT_MS",
              help="Heartbeat interval; must equal the broker's.")
@click.option("--liveness", type=int, default=defaults.LIVENESS, show_default=True, envvar="ZRPC_LIVENESS",
              help="Missed heartbeats before the broker is declared dead; must equal the broker's.")
@click.option("--max-message-size", type=click.IntRange(min=1024), default=defaults.MAX_MESSAGE_SIZE, show_default=True,
              envvar="ZRPC_MAX_MESSAGE_SIZE", help="Largest message accepted; at least the broker's.")
@click.option("--stream-window", type=click.IntRange(min=1024), default=defaults.STREAM_WINDOW, show_default=True,
              envvar="ZRPC_STREAM_WINDOW", help="Per-stream receive window (bytes).")
@click.option("--max-buffered-messages", type=click.IntRange(min=1), default=defaults.MAX_BUFFERED_MESSAGES, show_default=True,
              envvar="ZRPC_MAX_BUFFERED_MESSAGES", help="Events queued per stream before it is ended.")
@click.option("--chat-rate-per-s", type=click.FloatRange(min=0), default=None, envvar="ZRPC_CHAT_RATE_PER_S",
              help="Chat messages per second per user on this shard (0: no limit; default 50).")
@click.option("--chat-rate-burst", type=click.IntRange(min=1), default=None, envvar="ZRPC_CHAT_RATE_BURST",
              help="Chat messages a user may send at once (default 100).")
@click.option("--app", "app_ref", default=DEFAULT_APP, show_default=True, envvar="ZRPC_APP",
              help="module:function building what this worker serves (given the Worker).")
@click.option("--log-level", type=LOG_LEVELS, default=defaults.LOG_LEVEL, show_default=True, envvar="ZRPC_LOG_LEVEL")
@click.pass_context
def main(ctx: click.Context, config_json: str | None, shard: int | None, shards: int | None,
         brokers: tuple[str, ...], bus: str | None, data_dir: str | None, store: str | None,
         cluster_keys: str | None, cluster_insecure: bool, heartbeat_ms: int, liveness: int, max_message_size: int, stream_window: int,
         max_buffered_messages: int, chat_rate_per_s: float | None, chat_rate_burst: int | None,
         app_ref: str, log_level: str) -> None:
    """Serve shard SHARD of SHARDS for the brokers at BROKER.

    Registers with each broker (READY), heartbeats, runs the chat service for
    the rooms whose stable hash falls on this shard, and publishes room events
    on its bus. SIGTERM/SIGINT stop it cleanly (streams ended, history flushed).
    A broker that refuses this worker for a setting that must agree (shard
    count, heartbeat, message size) makes it exit with status 78 and the reason.

    With a PostgreSQL --store, several workers may be started for one shard:
    one holds the shard's lease and serves, the others wait as standbys and
    take over when it dies. A worker that loses its lease exits with status 75.
    """
    config = _config(ctx, config_json, shard, shards, brokers, bus, data_dir, store, cluster_keys,
                     cluster_insecure, heartbeat_ms, liveness, max_message_size, stream_window, max_buffered_messages,
                     chat_rate_per_s, chat_rate_burst, app_ref, log_level)
    setup_logging(config.log_level, f"worker-{config.shard}")
    if config.cluster_keys:
        try:
            ClusterKeys.load(config.cluster_keys, "worker")
        except ValueError as exc:
            raise click.UsageError(f"--cluster-keys: {exc}") from None
    if config.data_dir:
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    try:
        factory = load_app(config.app)
    except (ImportError, AttributeError, ValueError) as exc:
        raise click.UsageError(f"--app {config.app}: {exc}") from None

    async def run() -> str | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await serve(config, factory, stop)

    tune_gc(young_threshold=20_000)
    try:
        fatal = run_async(run())
    except LeaseLost as exc:
        click.echo(f"zrpc-worker: {exc}; exiting (restarted, it waits as a standby)", err=True)
        sys.exit(EX_TEMPFAIL)
    if fatal is not None:
        click.echo(f"zrpc-worker: {fatal}", err=True)
        sys.exit(EX_CONFIG)


def _config(ctx: click.Context, config_json: str | None, shard: int | None, shards: int | None,
            brokers: tuple[str, ...], bus: str | None, data_dir: str | None, store: str | None,
            cluster_keys: str | None, cluster_insecure: bool, heartbeat_ms: int, liveness: int, max_message_size: int, stream_window: int,
            max_buffered_messages: int, chat_rate_per_s: float | None, chat_rate_burst: int | None,
            app_ref: str, log_level: str) -> WorkerConfig:
    """The one WorkerConfig, from --config or from the other options."""
    try:
        if config_json is not None:
            given = [p.name for p in main.params if p.name not in ("config_json", "shard")
                     and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE]
            if given:
                raise click.UsageError(f"--config cannot be combined with --{given[0].replace('_', '-')}")
            config = WorkerConfig.from_json(config_json)
            if shard is not None and shard != config.shard:  # --shard labels the process for ps
                raise click.UsageError(f"--shard {shard} disagrees with the config's shard {config.shard}")
            return config
        for name, value in (("--shard", shard), ("--shards", shards)):
            if value is None:
                raise click.UsageError(f"Missing option '{name}'.")
        if not brokers:
            raise click.UsageError("Missing option '--broker'.")
        if not data_dir and not store:
            raise click.UsageError("Missing option '--data-dir' (or --store).")
        check_store_url(store)
        assert shard is not None and shards is not None
        options: dict[str, float | int] = {}
        if chat_rate_per_s is not None:
            options["rate_per_s"] = chat_rate_per_s
        if chat_rate_burst is not None:
            options["rate_burst"] = chat_rate_burst
        return WorkerConfig(shard=shard, shards=shards, brokers=brokers,
                            bus=bus or _default_bus(brokers[0], shard), data_dir=data_dir or "",
                            store=store or "", cluster_keys=cluster_keys or "",
                            cluster_insecure=cluster_insecure, heartbeat_ms=heartbeat_ms, liveness=liveness, app=app_ref,
                            log_level=log_level, max_message_size=max_message_size,
                            stream_window=stream_window, max_buffered_messages=max_buffered_messages,
                            app_options=options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


if __name__ == "__main__":
    main()
