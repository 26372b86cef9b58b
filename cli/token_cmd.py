"""``zrpc token create``: mint a JWT bearer token for a broker started with ``--auth-secret``.

The token alone is printed on stdout, so it composes::

    export ZRPC_TOKEN=$(zrpc token create --user alice --rooms general,team-*)
    zrpc send --room general --user whoever hello    # stored as alice
"""

from __future__ import annotations

import click

from zrpc.auth import mint_token

__all__ = ["token"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def token() -> None:
    """Bearer tokens (JWT) for servers that require authentication."""


@token.command()
@click.option("--user", "-u", required=True, help="The identity (the token's sub claim).")
@click.option("--rooms", default=None, metavar="A,B,...",
              help="Comma-separated rooms (or fnmatch globs like team-*) the token allows "
                   "(default: every room).")
@click.option("--ttl", type=click.IntRange(min=1), default=3600, show_default=True,
              metavar="SECONDS", help="Lifetime; the server closes connections when it ends.")
@click.option("--secret", default=None, envvar="ZRPC_AUTH_SECRET",
              help="HMAC secret shared with the server's --auth-secret [env ZRPC_AUTH_SECRET; "
                   "prefer the environment: arguments show in the process list].")
@click.option("--private-key", type=click.Path(exists=True, dir_okay=False), default=None,
              envvar="ZRPC_AUTH_PRIVATE_KEY",
              help="PEM private key instead of --secret (the server has the public key) "
                   "[env ZRPC_AUTH_PRIVATE_KEY].")
@click.option("--algorithm", default=None,
              help="JWT algorithm (default HS256 with --secret, RS256 with --private-key; "
                   "ES256 for an EC key).")
@click.option("--audience", default=None, envvar="ZRPC_AUTH_AUDIENCE", help="aud claim.")
@click.option("--issuer", default=None, envvar="ZRPC_AUTH_ISSUER", help="iss claim.")
def create(user: str, rooms: str | None, ttl: int, secret: str | None, private_key: str | None,
           algorithm: str | None, audience: str | None, issuer: str | None) -> None:
    """Print a signed token for USER on stdout (nothing else)."""
    if not user.strip():
        raise click.BadParameter("must not be empty", param_hint="'--user'")
    if (secret is None) == (private_key is None):
        raise click.UsageError("give exactly one of --secret (or ZRPC_AUTH_SECRET) and --private-key")
    room_list = None
    if rooms is not None:
        room_list = [r.strip() for r in rooms.split(",") if r.strip()]
    key: str | bytes
    if secret is not None:
        key, alg = secret, algorithm or "HS256"
    else:
        assert private_key is not None
        with open(private_key, "rb") as f:
            key = f.read()
        alg = algorithm or _key_algorithm(key)
    try:
        text = mint_token(key, user, rooms=room_list, ttl_s=ttl, algorithm=alg,
                          audience=audience, issuer=issuer)
    except Exception as exc:  # any signing failure (bad key, wrong algorithm) is a usage error
        raise click.UsageError(f"cannot sign the token: {exc}") from None
    click.echo(text)


def _key_algorithm(pem: bytes) -> str:
    """The default algorithm for a private key: ES256 (EC), EdDSA (Ed25519), else RS256."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem, None)
    except (ValueError, TypeError) as exc:
        raise click.UsageError(f"--private-key: not an unencrypted PEM private key ({exc})") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    return "RS256"
