"""Shared CLI plumbing: logging set-up, the event loop, TLS options, address parameters."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from zrpc.address import AddressError, parse_address
from zrpc.redact import RedactingFilter
from zrpc.tls import TlsConfig

__all__ = [
    "LOG_LEVELS",
    "AddressParam",
    "EnvOption",
    "check_store_url",
    "run_async",
    "setup_logging",
    "tls_from_options",
    "tune_gc",
]

T = TypeVar("T")
LOG_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)


class AddressParam(click.ParamType):
    """An endpoint address (see :mod:`zrpc.address`), checked and normalised to ``str``."""

    name = "HOST:PORT"

    def __init__(self, default_host: str = "localhost", allow_port_zero: bool = False) -> None:
        self.default_host = default_host
        self.allow_port_zero = allow_port_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return str(parse_address(str(value), default_host=self.default_host,
                                     allow_port_zero=self.allow_port_zero))
        except AddressError as exc:
            self.fail(str(exc), param, ctx)


class EnvOption(click.Option):
    """An option whose environment variable had other names, still read with a warning.

    Every variable is ``ZRPC_`` + the option's long name (``--max-message-size``:
    ``ZRPC_MAX_MESSAGE_SIZE``); ``deprecated_envvars`` lists the older names.
    """

    def __init__(self, *args: Any, deprecated_envvars: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deprecated_envvars = deprecated_envvars

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        value = super().resolve_envvar_value(ctx)
        if value is not None:
            return value
        for old in self.deprecated_envvars:
            value = os.environ.get(old)
            if value:
                click.echo(f"warning: {old} is deprecated and will be removed; set {self.envvar} "
                           "instead", err=True)
                return value
        return None


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format=f"%(asctime)s level=%(levelname)s proc={name} logger=%(name)s msg=%(message)s",
    )
    for handler in logging.getLogger().handlers:  # no token or secret in any line
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def tune_gc(young_threshold: int | None = None) -> None:
    """For the long-running server processes: fewer collector passes on the hot path.

    Everything imported so far is moved out of the collector's view
    (``gc.freeze``). A worker also raises the young-generation threshold
    (``young_threshold`` net allocations instead of 700): its per-call objects
    (tasks, futures) are freed by reference counting, so frequent passes were
    overhead in the profiles. The broker keeps the default threshold: it meets
    hostile clients, whose failed connections leave reference cycles
    (exceptions and their tracebacks) that should be reclaimed promptly.
    """
    import gc

    gc.collect()
    gc.freeze()
    if young_threshold is not None:
        _, g1, g2 = gc.get_threshold()
        gc.set_threshold(young_threshold, g1, g2)


def check_store_url(url: str | None, *, shards: int = 1) -> None:
    """``--store``: a usage error for a URL the workers could not open.

    Several shards cannot share one SQLite file: its URL needs ``{shard}``.
    """
    if not url:
        return
    from workers.chat.store import StoreConfig

    try:
        config = StoreConfig(url.replace("{shard}", "0"))
    except ValueError as exc:
        raise click.UsageError(f"--store {url}: {exc}") from None
    if config.kind == "sqlite" and shards > 1 and "{shard}" not in url:
        raise click.UsageError(f"--store {url}: each shard needs its own SQLite file; "
                               "put {shard} in the path (e.g. sqlite:///var/lib/zrpc/shard-{shard}.sqlite)")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop (the production loop); ``ZRPC_EVENT_LOOP=asyncio`` picks the stdlib loop."""
    if os.environ.get("ZRPC_EVENT_LOOP") == "asyncio":
        return asyncio.run(coro)
    import uvloop

    return uvloop.run(coro)


def tls_from_options(cert: str | None, key: str | None, ca: str | None, insecure: bool,
                     require_client_cert: bool = False) -> TlsConfig:
    """Explicit files, plaintext only with --insecure, else the development CA."""
    if insecure:
        if cert or key or ca:
            raise click.UsageError("--insecure (plaintext) cannot be combined with --cert/--key/--ca")
        return TlsConfig.insecure_plaintext()
    if cert or key:
        if not (cert and key):
            raise click.UsageError("--cert and --key go together")
        return TlsConfig(cert_file=cert, key_file=key, ca_file=ca, require_client_cert=require_client_cert)
    dev = TlsConfig.development()
    if require_client_cert:
        from dataclasses import replace
        return replace(dev, require_client_cert=True, ca_file=ca or dev.ca_file)
    if ca:
        from dataclasses import replace
        return replace(dev, ca_file=ca)
    return dev
