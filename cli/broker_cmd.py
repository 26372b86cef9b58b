"""``zrpc-broker``: the front process (``zrpc-broker start``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import replace

import click

from broker.broker import Broker, BrokerConfig
from cli.common import LOG_LEVELS, run_async, setup_logging, tls_from_options
from zrpc.config import ServerConfig, StreamConfig

__all__ = ["main"]

log = logging.getLogger("zrpc.broker")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The zrpc broker: TLS front end, shard workers over ZeroMQ, room fan-out."""


@main.command()
@click.option("--listen", default="127.0.0.1:8443", show_default=True, envvar="ZRPC_LISTEN",
              help="HOST:PORT for client connections (port 0 picks a free one).")
@click.option("--workers", type=int, default=2, show_default=True, envvar="ZRPC_WORKERS",
              help="Shard workers to spawn and supervise; 0 waits for external `zrpc-worker`s.")
@click.option("--shards", type=int, default=None, envvar="ZRPC_SHARDS",
              help="Number of shards (default: --workers; required with --workers 0).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, envvar="ZRPC_DATA_DIR",
              help="Where workers keep history (default: $ZRPC_HOME/data).")
@click.option("--router", default=None, envvar="ZRPC_ROUTER",
              help="ZeroMQ endpoint workers connect to (default: ipc:// in the runtime dir; "
                   "tcp://0.0.0.0:7000 for workers on other hosts).")
@click.option("--runtime-dir", type=click.Path(file_okay=False), default=None, envvar="ZRPC_RUNTIME_DIR",
              help="Directory for ipc:// endpoints (default: a fresh temporary directory).")
@click.option("--cert", default=None, envvar="ZRPC_TLS_CERT", help="Server certificate chain (PEM).")
@click.option("--key", default=None, envvar="ZRPC_TLS_KEY", help="Server private key (PEM).")
@click.option("--ca", default=None, envvar="ZRPC_TLS_CA", help="CA bundle for client certificates (mTLS).")
@click.option("--require-client-cert", is_flag=True, envvar="ZRPC_REQUIRE_CLIENT_CERT",
              help="Mutual TLS: clients must present a certificate signed by --ca.")
@click.option("--insecure", is_flag=True, envvar="ZRPC_INSECURE", help="Plaintext, no TLS (development only).")
@click.option("--heartbeat-ms", type=int, default=1000, show_default=True, envvar="ZRPC_HEARTBEAT_MS",
              help="Heartbeat interval between broker and workers.")
@click.option("--liveness", type=int, default=3, show_default=True, envvar="ZRPC_LIVENESS",
              help="Missed heartbeats before a worker is declared dead.")
@click.option("--max-connections", type=int, default=10_000, show_default=True, envvar="ZRPC_MAX_CONNECTIONS")
@click.option("--max-message-size", type=int, default=4 * 1024 * 1024, show_default=True,
              envvar="ZRPC_MAX_MESSAGE_SIZE")
@click.option("--max-buffered-messages", type=int, default=4096, show_default=True,
              envvar="ZRPC_MAX_BUFFERED_MESSAGES",
              help="Broadcast events queued per stream for a slow client before it gets RESOURCE_EXHAUSTED.")
@click.option("--stream-window", type=int, default=256 * 1024, show_default=True, envvar="ZRPC_STREAM_WINDOW",
              help="Per-stream flow-control window in bytes.")
@click.option("--grace", type=float, default=10.0, show_default=True, envvar="ZRPC_GRACE",
              help="Seconds in-flight calls get to finish on SIGTERM/SIGINT.")
@click.option("--metrics-port", type=int, default=None, envvar="ZRPC_METRICS_PORT",
              help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics.")
@click.option("--app", "app_ref", default=None, envvar="ZRPC_APP",
              help="module:function the workers serve (default: the chat service).")
@click.option("--log-level", type=LOG_LEVELS, default="INFO", show_default=True, envvar="ZRPC_LOG_LEVEL")
@click.option("--debug-frames", is_flag=True, envvar="ZRPC_DEBUG_FRAMES",
              help="Trace every frame at DEBUG level (enable_debug_logging).")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None, envvar="ZRPC_READY_FILE",
              help="Write {address, pid, router} as JSON here once every shard has a live worker.")
def start(listen: str, workers: int, shards: int | None, data_dir: str | None, router: str | None,
          runtime_dir: str | None, cert: str | None, key: str | None, ca: str | None,
          require_client_cert: bool, insecure: bool, heartbeat_ms: int, liveness: int,
          max_connections: int, max_message_size: int, max_buffered_messages: int,
          stream_window: int, grace: float, metrics_port: int | None,
          app_ref: str | None, log_level: str, debug_frames: bool, ready_file: str | None) -> None:
    """Start the broker and its shard workers; runs until SIGTERM/SIGINT.

    Clients connect to --listen with TLS (development certificates under
    $ZRPC_HOME unless --cert/--key are given). On SIGTERM/SIGINT the broker
    sends GOAWAY, lets in-flight calls finish for --grace seconds, stops the
    workers and exits 0. Every option can also be set from the environment
    variable shown in brackets.
    """
    setup_logging("DEBUG" if debug_frames else log_level, "broker")
    if workers < 0:
        raise click.UsageError("--workers must be >= 0")
    if workers == 0 and not shards:
        raise click.UsageError("--shards is required with --workers 0")
    tls = tls_from_options(cert, key, ca, insecure, require_client_cert)
    try:
        streams = StreamConfig(buffer_size=stream_window, max_buffered_messages=max_buffered_messages)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    server = replace(ServerConfig(), max_connections=max_connections, max_message_size=max_message_size,
                     shutdown_grace_ms=int(grace * 1000), enable_debug_logging=debug_frames,
                     stream_config=streams)
    config = BrokerConfig(listen=listen, tls=tls, workers=workers, shards=shards, data_dir=data_dir,
                          runtime_dir=runtime_dir, router=router, heartbeat_ms=heartbeat_ms,
                          liveness=liveness, server=server, metrics_port=metrics_port,
                          log_level=log_level, worker_args=("--app", app_ref) if app_ref else ())

    async def run() -> None:
        broker = Broker(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if insecure:
            log.warning("PLAINTEXT listener: no TLS, development only")
        log.warning("authentication is off: clients name themselves")
        host, port = await broker.start()
        click.echo(f"zrpc broker listening on {host}:{port} ({workers} worker(s), "
                   f"{config.shard_count} shard(s)); Ctrl-C to stop", err=True)

        async def announce() -> None:
            await broker.registry_ready()
            if ready_file:
                tmp = ready_file + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"address": f"{host}:{port}", "pid": os.getpid(),
                               "router": broker.router_endpoint}, f)
                os.replace(tmp, ready_file)
            log.info("all %d shard(s) have a live worker: serving", config.shard_count)

        ready = asyncio.create_task(announce())
        await stop.wait()
        ready.cancel()
        log.info("shutting down (grace %.1fs)", grace)
        await broker.shutdown(grace)

    run_async(run())


if __name__ == "__main__":
    main()
