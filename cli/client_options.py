"""The ``zrpc`` client's global options, declared once.

``--server``, ``--ca``, ``--cert``, ``--key``, ``--insecure``, ``--token``,
``--timeout`` and ``--json`` are accepted both before the subcommand
(``zrpc --server h:1 send ...``) and after it (``zrpc send --server h:1 ...``,
as kubectl and gh do); a value given after the subcommand wins. Defaults and
environment variables apply at the group level only, so that an explicit
value in either place beats them.

:data:`GLOBAL_OPTIONS` is the single declaration; :class:`ClientGroup` adds
the subcommand copies to every command it registers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import click
from click.core import ParameterSource

from cli.common import AddressParam

__all__ = ["GLOBAL_OPTIONS", "ClientGroup", "GlobalOption", "group_options"]


@dataclass(frozen=True)
class GlobalOption:
    """One global option: its declarations and its group-level settings."""

    decls: tuple[str, ...]
    dest: str
    help: str
    envvar: str | None = None
    default: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def for_group(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return click.option(*self.decls, self.dest, default=self.default, envvar=self.envvar,
                            show_default=self.default is not None and not self.kwargs.get("is_flag"),
                            help=self.help + (f" [env {self.envvar}]" if self.envvar else ""),
                            **self.kwargs)

    def for_command(self) -> click.Option:
        """The subcommand's copy: no default, no env var; an explicit value overrides the group's."""
        kwargs = dict(self.kwargs)
        if kwargs.get("is_flag"):
            kwargs["default"] = False
        return click.Option([*self.decls, self.dest], expose_value=False, callback=_override,
                            help=self.help, **kwargs)


def _file(**kw: Any) -> dict[str, Any]:
    return {"type": click.Path(exists=True, dir_okay=False), "metavar": "FILE", **kw}


GLOBAL_OPTIONS: Final[tuple[GlobalOption, ...]] = (
    GlobalOption(("--server", "-s"), "server", "Server (or broker) address: HOST:PORT, :PORT, PORT, "
                 "[IPv6]:PORT or zrpc://HOST:PORT.", "ZRPC_SERVER", "localhost:8443",
                 {"type": AddressParam(), "metavar": "HOST:PORT"}),
    GlobalOption(("--ca",), "ca", "CA bundle that signs the server certificate (default: the system "
                 "store plus the development CA under $ZRPC_HOME if present).", "ZRPC_CA", None, _file()),
    GlobalOption(("--cert",), "cert", "Client certificate for mutual TLS.", "ZRPC_CLIENT_CERT", None,
                 _file()),
    GlobalOption(("--key",), "key", "Private key of --cert.", "ZRPC_CLIENT_KEY", None, _file()),
    GlobalOption(("--insecure",), "insecure", "Plaintext, no TLS (only against a server started "
                 "with --insecure).", "ZRPC_INSECURE", False, {"is_flag": True}),
    GlobalOption(("--token",), "token", "Bearer token sent when connecting.", "ZRPC_TOKEN", None,
                 {"metavar": "TOKEN"}),
    GlobalOption(("--timeout",), "timeout", "Deadline for connecting and for each request/response "
                 "call (streams stay open).", "ZRPC_TIMEOUT", None,
                 {"type": click.FloatRange(min=0, min_open=True), "metavar": "SECONDS"}),
    GlobalOption(("--json",), "json_mode", "Print one JSON object per line on stdout.", None, False,
                 {"is_flag": True}),
)


def group_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate the group's callback with every global option."""
    for opt in reversed(GLOBAL_OPTIONS):
        f = opt.for_group()(f)
    return f


#: Called with (context, option dest, value) when a subcommand overrides a global option.
Override = Callable[[click.Context, str, Any], None]


def _override(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if param.name is not None and ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
        apply = ctx.meta.get("zrpc.override")
        if apply is not None:
            apply(ctx, param.name, value)
    return value


class ClientGroup(click.Group):
    """A group whose commands also accept the global options (see module docstring).

    ``on_override(ctx, dest, value)`` receives each value given after a subcommand.
    """

    def __init__(self, *args: Any, on_override: Override | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_override = on_override

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not isinstance(cmd, click.Group):
            taken = {n for p in cmd.params for n in p.opts}
            cmd.params.extend(o.for_command() for o in GLOBAL_OPTIONS if not taken & set(o.decls))
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        ctx.meta["zrpc.override"] = self.on_override
        return super().invoke(ctx)
