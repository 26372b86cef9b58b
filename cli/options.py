"""The table of every command-line option and environment variable (docs/operations.md).

``python -m cli.options`` prints it; ``python -m cli.options --write docs/operations.md``
replaces the generated section of that file; ``tests/test_options_doc.py`` fails
when the file and the commands disagree. Variables follow one rule:
``ZRPC_`` + the option's long name (:data:`EXCEPTIONS` lists the few that do not,
and why).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

__all__ = ["BEGIN", "END", "EXCEPTIONS", "OTHER_VARIABLES", "commands", "expected_envvar", "option_rows", "table", "write"]

BEGIN = "<!-- BEGIN GENERATED OPTION TABLE: python -m cli.options --write docs/operations.md -->"
END = "<!-- END GENERATED OPTION TABLE -->"

#: Variables that do not follow ``ZRPC_`` + option name, and why.
EXCEPTIONS = {
    ("zrpc", "--cert"): "ZRPC_CLIENT_CERT: the client's own certificate, never the broker's ZRPC_CERT",
    ("zrpc", "--key"): "ZRPC_CLIENT_KEY: the client's own key, never the broker's ZRPC_KEY",
    ("zrpc token create", "--secret"): "ZRPC_AUTH_SECRET: the broker's --auth-secret, the same secret",
    ("zrpc token create", "--private-key"): "ZRPC_AUTH_PRIVATE_KEY: pairs with --auth-public-key",
    ("zrpc token create", "--audience"): "ZRPC_AUTH_AUDIENCE: the broker's --auth-audience",
    ("zrpc token create", "--issuer"): "ZRPC_AUTH_ISSUER: the broker's --auth-issuer",
}


#: Variables read outside the option table.
OTHER_VARIABLES = (
    ("ZRPC_HOME", "Directory of development certificates and the default data directory "
                  "(default: $XDG_DATA_HOME/zrpc, else ~/.local/share/zrpc)."),
    ("ZRPC_WEB_ROOT", "Serve the chat page from this directory instead of the package's copy."),
    ("ZRPC_EVENT_LOOP", "`asyncio` runs the servers on the standard loop instead of uvloop."),
)


def commands() -> list[tuple[str, click.Command]]:
    from cli.broker_cmd import main as broker
    from cli.client_cmd import main as client
    from cli.worker_cmd import main as worker

    return [("zrpc-broker", broker), ("zrpc-worker", worker), ("zrpc", client)]


def _walk(path: str, cmd: click.Command, seen: set[str]) -> Iterator[tuple[str, click.Option]]:
    own = set()
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden and p.opts[0] not in ("--help", "--version"):
            if p.opts[0] in seen:  # a global option repeated on a subcommand
                continue
            own.add(p.opts[0])
            yield path, p
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from _walk(f"{path} {name}", cmd.commands[name], seen | own)


def expected_envvar(option: click.Option) -> str:
    return "ZRPC_" + option.opts[0].lstrip("-").replace("-", "_").upper()


def _default(p: click.Option) -> str:
    d = p.default
    if p.is_flag and not p.secondary_opts:
        return "on" if d is True else "off"
    if d is None or callable(d) or type(d).__name__ == "Sentinel" or d == () or d == "":
        return ""
    if p.secondary_opts:
        return p.opts[0] if d else p.secondary_opts[0]
    return f"{d:,}" if isinstance(d, int) and not isinstance(d, bool) and d >= 10_000 else str(d)


def option_rows() -> list[tuple[str, click.Option]]:
    return [row for name, cmd in commands() for row in _walk(name, cmd, set())]


def table() -> str:
    lines = ["| command | option | variable | default | what |", "|---|---|---|---|---|"]
    for path, p in option_rows():
        names = " / ".join(f"`{o}`" for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
        env = p.envvar if isinstance(p.envvar, str) else ""
        old = getattr(p, "deprecated_envvars", ())
        env_cell = f"`{env}`" if env else ""
        if old:
            env_cell += " (was " + ", ".join(f"`{o}`" for o in old) + ")"
        what = " ".join((p.help or "").split()).replace("|", "\\|")
        default = _default(p)
        lines.append(f"| `{path}` | {names} | {env_cell} | {f'`{default}`' if default else ''} | {what} |")
    lines += ["", "| variable | what |", "|---|---|"]
    lines += [f"| `{name}` | {what} |" for name, what in OTHER_VARIABLES]
    return "\n".join(lines) + "\n"


def write(path: str | Path) -> bool:
    """Replace the generated section of ``path``; True when it changed."""
    p = Path(path)
    text = p.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    new = text[:start] + "\n\n" + table() + "\n" + text[end:]
    if new != text:
        p.write_text(new)
    return new != text


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"] and len(sys.argv) == 3:
        print("updated" if write(sys.argv[2]) else "unchanged", sys.argv[2])
    else:
        sys.stdout.write(table())
