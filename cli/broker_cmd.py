"""``zrpc-broker``: the front process (``zrpc-broker start``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import replace

import click

from broker.broker import Broker, BrokerConfig, StartupError
from cli.common import (
    LOG_LEVELS,
    AddressParam,
    EnvOption,
    check_store_url,
    run_async,
    setup_logging,
    tls_from_options,
    tune_gc,
)
from cluster.config import DEFAULT_APP
from zrpc import defaults
from zrpc.auth import JwtAuthenticator
from zrpc.config import ServerConfig, StreamConfig

__all__ = ["main"]

log = logging.getLogger("zrpc.broker")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The zrpc broker: TLS front end, shard workers over ZeroMQ, room fan-out."""


def _authenticator(secret: str | None, public_key_file: str | None, audience: str | None,
                   issuer: str | None, leeway: float, require_exp: bool = True) -> JwtAuthenticator | None:
    if secret is not None and public_key_file is not None:
        raise click.UsageError("--auth-secret and --auth-public-key are mutually exclusive")
    if secret is None and public_key_file is None:
        if audience or issuer:
            raise click.UsageError("--auth-audience/--auth-issuer need --auth-secret or --auth-public-key")
        return None
    try:
        if secret is not None:
            return JwtAuthenticator(secret=secret, audience=audience, issuer=issuer, leeway=leeway,
                                    require_exp=require_exp)
        assert public_key_file is not None
        with open(public_key_file, "rb") as f:
            key = f.read()
        return JwtAuthenticator(public_key=key, audience=audience, issuer=issuer, leeway=leeway,
                                require_exp=require_exp)
    except (ValueError, OSError) as exc:
        raise click.UsageError(f"authentication: {exc}") from None


@main.command()
@click.option("--listen", default=defaults.LISTEN, show_default=True, envvar="ZRPC_LISTEN",
              type=AddressParam(default_host="127.0.0.1", allow_port_zero=True),
              help="HOST:PORT for client connections (also :PORT, PORT, [IPv6]:PORT; "
                   "port 0 picks a free one).")
@click.option("--quic-listen", default=None, envvar="ZRPC_QUIC_LISTEN",
              type=AddressParam(default_host="127.0.0.1", allow_port_zero=True),
              help="Also accept zrpc over QUIC on this UDP HOST:PORT (same certificates, limits, "
                   "auth and metrics as --listen; clients use quic://HOST:PORT). Off by default.")
@click.option("--workers", type=int, default=defaults.WORKERS, show_default=True, envvar="ZRPC_WORKERS",
              help="Shard workers to spawn and supervise; 0 waits for external `zrpc-worker`s.")
@click.option("--shards", type=int, default=None, envvar="ZRPC_SHARDS",
              help="Number of shards (default: --workers; required with --workers 0).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, envvar="ZRPC_DATA_DIR",
              help="Where workers keep history (default: $ZRPC_HOME/data).")
@click.option("--cluster-keys", type=click.Path(file_okay=False), default=None, envvar="ZRPC_CLUSTER_KEYS",
              help="CurveZMQ key set (from `zrpc-broker keys create DIR`): encrypt and authenticate "
                   "every tcp:// link between brokers and workers.")
@click.option("--cluster-insecure", is_flag=True, envvar="ZRPC_CLUSTER_INSECURE",
              help="Allow plaintext tcp:// cluster links on non-loopback addresses.")
@click.option("--store", default=None, envvar="ZRPC_STORE",
              help="History store URL for the workers: postgresql://user@host:port/db, or "
                   "sqlite:///path/shard-{shard}.sqlite (default: DATA_DIR/shard-N.sqlite).")
@click.option("--router", default=None, envvar="ZRPC_ROUTER",
              help="ZeroMQ endpoint workers connect to (default: ipc:// in the runtime dir; "
                   "tcp://0.0.0.0:7000 for workers on other hosts).")
@click.option("--runtime-dir", type=click.Path(file_okay=False), default=None, envvar="ZRPC_RUNTIME_DIR",
              help="Directory for ipc:// endpoints (default: a fresh temporary directory).")
@click.option("--local-link", type=click.Choice(["unix", "zmq"]), default=defaults.LOCAL_LINK, show_default=True,
              envvar="ZRPC_LOCAL_LINK",
              help="How spawned workers link to the broker: a Unix stream socket in the runtime dir "
                   "(one wake-up per hop) or ZeroMQ over --router. Workers started on their own "
                   "(zrpc-worker --broker) always use ZeroMQ.")
@click.option("--cert", default=None, envvar="ZRPC_CERT", cls=EnvOption,
              deprecated_envvars=("ZRPC_TLS_CERT",), type=click.Path(exists=True, dir_okay=False), help="Server certificate chain (PEM).")
@click.option("--key", default=None, envvar="ZRPC_KEY", cls=EnvOption,
              deprecated_envvars=("ZRPC_TLS_KEY",), type=click.Path(exists=True, dir_okay=False), help="Server private key (PEM).")
@click.option("--ca", default=None, envvar="ZRPC_CA", cls=EnvOption,
              deprecated_envvars=("ZRPC_TLS_CA",), type=click.Path(exists=True, dir_okay=False), help="CA bundle for client certificates (mTLS).")
@click.option("--require-client-cert", is_flag=True, envvar="ZRPC_REQUIRE_CLIENT_CERT",
              help="Mutual TLS: clients must present a certificate signed by --ca.")
@click.option("--insecure", is_flag=True, envvar="ZRPC_INSECURE", help="Plaintext, no TLS (development only).")
@click.option("--heartbeat-ms", type=int, default=defaults.HEARTBEAT_MS, show_default=True, envvar="ZRPC_HEARTBEAT_MS",
              help="Heartbeat interval between broker and workers.")
@click.option("--liveness", type=int, default=defaults.LIVENESS, show_default=True, envvar="ZRPC_LIVENESS",
              help="Missed heartbeats before a worker is declared dead.")
@click.option("--max-connections", type=int, default=defaults.MAX_CONNECTIONS, show_default=True, envvar="ZRPC_MAX_CONNECTIONS")
@click.option("--max-connections-per-ip", type=click.IntRange(min=1), default=defaults.MAX_CONNECTIONS_PER_IP, show_default=True,
              envvar="ZRPC_MAX_CONNECTIONS_PER_IP",
              help="Connections one client IP may hold; past it RESOURCE_EXHAUSTED.")
@click.option("--idle-timeout-ms", type=click.IntRange(min=0), default=defaults.IDLE_TIMEOUT_MS, show_default=True,
              envvar="ZRPC_IDLE_TIMEOUT_MS",
              help="Close connections that had no stream for this long (0: never).")
@click.option("--auth-secret", default=None, envvar="ZRPC_AUTH_SECRET",
              help="Require JWT bearer tokens signed with this HMAC secret (HS256).")
@click.option("--auth-public-key", type=click.Path(exists=True, dir_okay=False), default=None,
              envvar="ZRPC_AUTH_PUBLIC_KEY",
              help="Require JWT bearer tokens signed by this public key (PEM; RS256/ES256).")
@click.option("--auth-audience", default=None, envvar="ZRPC_AUTH_AUDIENCE",
              help="Tokens must carry this audience (aud).")
@click.option("--auth-issuer", default=None, envvar="ZRPC_AUTH_ISSUER",
              help="Tokens must carry this issuer (iss).")
@click.option("--auth-leeway", type=click.FloatRange(min=0), default=0.0, show_default=True,
              envvar="ZRPC_AUTH_LEEWAY", help="Seconds of clock skew tolerated on exp/nbf.")
@click.option("--auth-require-exp/--auth-allow-no-exp", default=True, show_default=True,
              envvar="ZRPC_AUTH_REQUIRE_EXP",
              help="Refuse tokens without an expiry (exp claim); --auth-allow-no-exp accepts "
                   "them (valid forever).")
@click.option("--chat-rate-per-s", type=click.FloatRange(min=0), default=None,
              envvar="ZRPC_CHAT_RATE_PER_S",
              help="Messages per second each chat user may send (default 50; 0: unlimited).")
@click.option("--chat-rate-burst", type=click.IntRange(min=1), default=None,
              envvar="ZRPC_CHAT_RATE_BURST", help="Chat messages a user may send at once (default 100).")
@click.option("--chat-presence-names-per-connection", type=click.IntRange(min=1), default=None,
              envvar="ZRPC_CHAT_PRESENCE_NAMES_PER_CONNECTION",
              help="Distinct user names one connection may keep present in chat rooms (default 16).")
@click.option("--chat-presence-names-per-ip", type=click.IntRange(min=1), default=None,
              envvar="ZRPC_CHAT_PRESENCE_NAMES_PER_IP",
              help="Distinct user names the unauthenticated connections of one IP may keep present "
                   "(default 256, per shard).")
@click.option("--max-message-size", type=int, default=defaults.MAX_MESSAGE_SIZE, show_default=True,
              envvar="ZRPC_MAX_MESSAGE_SIZE")
@click.option("--max-buffered-messages", type=int, default=defaults.MAX_BUFFERED_MESSAGES, show_default=True,
              envvar="ZRPC_MAX_BUFFERED_MESSAGES",
              help="Broadcast events queued per stream for a slow client before it gets RESOURCE_EXHAUSTED.")
@click.option("--max-buffered-bytes", type=click.IntRange(min=1), default=defaults.MAX_BUFFERED_BYTES,
              show_default=True, envvar="ZRPC_MAX_BUFFERED_BYTES",
              help="Bytes of broadcast events queued per stream for a slow client before it gets "
                   "RESOURCE_EXHAUSTED.")
@click.option("--max-connection-buffer", type=click.IntRange(min=1), default=defaults.MAX_CONNECTION_BUFFER,
              show_default=True, envvar="ZRPC_MAX_CONNECTION_BUFFER",
              help="Bytes that may wait for one client (queued messages and the socket's buffer); "
                   "past it the connection gets GOAWAY RESOURCE_EXHAUSTED.")
@click.option("--max-buffer-memory", type=click.IntRange(min=1), default=defaults.MAX_BUFFER_MEMORY,
              show_default=True, envvar="ZRPC_MAX_BUFFER_MEMORY",
              help="Bytes that may wait for all clients together; past it the connection with the "
                   "most waiting gets GOAWAY RESOURCE_EXHAUSTED.")
@click.option("--stream-window", type=int, default=defaults.STREAM_WINDOW, show_default=True, envvar="ZRPC_STREAM_WINDOW",
              help="Per-stream flow-control window in bytes.")
@click.option("--grace", type=float, default=defaults.SHUTDOWN_GRACE_MS / 1000, show_default=True, envvar="ZRPC_GRACE",
              help="Seconds in-flight calls get to finish on SIGTERM/SIGINT.")
@click.option("--metrics-port", type=int, default=None, envvar="ZRPC_METRICS_PORT",
              help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics.")
@click.option("--app", "app_ref", default=None, envvar="ZRPC_APP",
              help="module:function the workers serve (default: the chat service).")
@click.option("--log-level", type=LOG_LEVELS, default=defaults.LOG_LEVEL, show_default=True, envvar="ZRPC_LOG_LEVEL")
@click.option("--log-summary-interval", type=click.FloatRange(min=0), default=60.0, show_default=True,
              envvar="ZRPC_LOG_SUMMARY_INTERVAL", metavar="SECONDS",
              help="Log one INFO line of activity (connections, calls, errors by status) this often "
                   "when there was any; 0 turns it off.")
@click.option("--debug-frames", is_flag=True, envvar="ZRPC_DEBUG_FRAMES",
              help="Trace every frame at DEBUG level (enable_debug_logging).")
@click.option("--web-port", type=click.IntRange(0, 65535), default=None, envvar="ZRPC_WEB_PORT",
              help="Serve the chat page over HTTPS on this port (same host and TLS as --listen) "
                   "with zrpc over WebSocket at /zrpc; 0 picks a free port. Off by default.")
@click.option("--web-origin", "web_origins", multiple=True, envvar="ZRPC_WEB_ORIGIN",
              help="Also accept WebSockets from pages of this origin (e.g. https://chat.example.com); "
                   "repeatable. The page's own origin is always accepted.")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None, envvar="ZRPC_READY_FILE",
              help="Write {address, pid, router, web, quic} as JSON here once every shard has a live "
                   "worker (web, quic: HOST:PORT of --web-port / --quic-listen, when on).")
def start(listen: str, quic_listen: str | None, workers: int, shards: int | None, data_dir: str | None,
          store: str | None, cluster_keys: str | None, cluster_insecure: bool, router: str | None,
          runtime_dir: str | None, local_link: str, cert: str | None, key: str | None, ca: str | None,
          require_client_cert: bool, insecure: bool, heartbeat_ms: int, liveness: int,
          max_connections: int, max_connections_per_ip: int, idle_timeout_ms: int,
          auth_secret: str | None, auth_public_key: str | None, auth_audience: str | None,
          auth_issuer: str | None, auth_leeway: float, auth_require_exp: bool,
          chat_rate_per_s: float | None,
          chat_rate_burst: int | None, chat_presence_names_per_connection: int | None,
          chat_presence_names_per_ip: int | None, max_message_size: int, max_buffered_messages: int,
          max_buffered_bytes: int, max_connection_buffer: int, max_buffer_memory: int,
          stream_window: int, grace: float, metrics_port: int | None,
          app_ref: str | None, log_level: str, log_summary_interval: float, debug_frames: bool,
          web_port: int | None,
          web_origins: tuple[str, ...], ready_file: str | None) -> None:
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
    check_store_url(store, shards=shards or workers)
    try:
        streams = StreamConfig(buffer_size=stream_window, max_buffered_messages=max_buffered_messages,
                               max_buffered_bytes=max_buffered_bytes)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    authenticator = _authenticator(auth_secret, auth_public_key, auth_audience, auth_issuer,
                                   auth_leeway, auth_require_exp)
    app_options: dict[str, float | int] = {}  # handed to each worker in its WorkerConfig
    if chat_rate_per_s is not None:
        app_options["rate_per_s"] = chat_rate_per_s
    if chat_rate_burst is not None:
        app_options["rate_burst"] = chat_rate_burst
    if chat_presence_names_per_connection is not None:
        app_options["max_presence_names_per_connection"] = chat_presence_names_per_connection
    if chat_presence_names_per_ip is not None:
        app_options["max_presence_names_per_ip"] = chat_presence_names_per_ip
    server = replace(ServerConfig(), max_connections=max_connections, max_message_size=max_message_size,
                     max_connections_per_ip=max_connections_per_ip,
                     idle_timeout_ms=idle_timeout_ms or None, authenticator=authenticator,
                     shutdown_grace_ms=int(grace * 1000), enable_debug_logging=debug_frames,
                     stream_config=streams, max_connection_buffer=max_connection_buffer,
                     max_buffer_memory=max_buffer_memory)
    config = BrokerConfig(listen=listen, quic_listen=quic_listen, tls=tls, workers=workers, shards=shards,
                          data_dir=data_dir, runtime_dir=runtime_dir, router=router, heartbeat_ms=heartbeat_ms,
                          liveness=liveness, server=server, metrics_port=metrics_port,
                          web_port=web_port, web_origins=tuple(web_origins),
                          log_level=log_level, app=app_ref or DEFAULT_APP, app_options=app_options,
                          store=store or "", cluster_keys=cluster_keys,
                          cluster_insecure=cluster_insecure,
                          log_summary_interval_s=log_summary_interval,
                          local_link=local_link)

    async def run() -> str | None:
        broker = Broker(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if insecure:
            log.warning("PLAINTEXT listener: no TLS, development only")
        if authenticator is None and not require_client_cert:
            log.warning("authentication is off: clients name themselves "
                        "(see --auth-secret / --auth-public-key, or mutual TLS)")
        elif authenticator is None:
            log.info("authentication: mutual TLS (the client certificate's CN is the identity)")
        else:
            log.info("authentication: JWT (%s); anonymous clients may only call Health/*",
                     ", ".join(authenticator.algorithms))
        try:
            host, port = await broker.start()
        except StartupError as exc:
            with contextlib.suppress(Exception):  # undo what did start (listeners, tasks)
                await broker.shutdown(0)
            raise click.ClickException(str(exc)) from None
        click.echo(f"zrpc broker listening on {host}:{port} ({workers} worker(s), "
                   f"{config.shard_count} shard(s)); Ctrl-C to stop", err=True)
        web = broker.web.address if broker.web is not None else None
        quic = broker.quic_address
        if quic is not None:
            click.echo(f"zrpc over QUIC on quic://{quic[0]}:{quic[1]} (UDP)", err=True)
        if broker.web is not None and web is not None:
            click.echo(f"chat page: {broker.web.scheme}://{'localhost' if web[0] in ('127.0.0.1', '::1') else web[0]}"
                       f":{web[1]}/", err=True)

        async def announce() -> None:
            await broker.registry_ready()
            if ready_file:
                tmp = ready_file + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"address": f"{host}:{port}", "pid": os.getpid(),
                               "router": broker.router_endpoint,
                               **({"web": f"{web[0]}:{web[1]}"} if web else {}),
                               **({"quic": f"{quic[0]}:{quic[1]}"} if quic else {})}, f)
                os.replace(tmp, ready_file)
            log.info("all %d shard(s) have a live worker: serving", config.shard_count)

        ready = asyncio.create_task(announce())
        failed = asyncio.create_task(broker.failed.wait())
        await asyncio.wait([asyncio.create_task(stop.wait()), failed], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        log.info("shutting down (grace %.1fs)", grace)
        await broker.shutdown(0 if broker.fatal else grace)
        log.info("stopped")
        return broker.fatal

    tune_gc()
    fatal = run_async(run())
    if fatal is not None:
        click.echo(f"zrpc-broker: {fatal}", err=True)
        sys.exit(1)



@main.group()
def keys() -> None:
    """CurveZMQ keys for the links between brokers and workers (--cluster-keys)."""


@keys.command("create")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="", help="Add one more worker key pair NAME to an existing set.")
def keys_create(directory: str, name: str) -> None:
    """Write a cluster key set into DIRECTORY.

    broker.key_secret goes to broker hosts, worker.key_secret to worker hosts,
    broker.key and authorized/ to every host; then start brokers and workers
    with --cluster-keys DIRECTORY (see docs/operations.md, "Production layout").
    """
    from cluster.curve import create_keys

    try:
        written = create_keys(directory, name)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(str(path))


if __name__ == "__main__":
    main()
