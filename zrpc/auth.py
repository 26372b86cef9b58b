"""Authentication: JWT bearer tokens checked at HELLO.

A client sends its token in HELLO (``ClientConfig.token``, ``zrpc --token``).
:class:`JwtAuthenticator` is the server's ``authenticator(hello, peer) ->
(identity, claims)``: it verifies the token with PyJWT, algorithms pinned
(``none`` is never accepted), and the token's ``sub`` becomes the caller's
identity. A bad, expired, not-yet-valid, wrongly signed or wrongly addressed
token refuses the connection with UNAUTHENTICATED. No token at all is an
anonymous connection (``allow_anonymous``): it may call ``Health/*`` only
(the broker enforces this itself; the in-process server with the
:func:`require_identity` interceptor), so load balancers can probe health
without credentials.

Tokens are checked once, at HELLO; a connection whose token carries ``exp``
is closed with UNAUTHENTICATED when it expires (the broker edge and
:class:`~zrpc.dispatch.ServerSession` schedule it), so a long-lived stream
cannot outlive its credentials.

Claims other than ``sub`` are the application's: the chat's ``rooms`` claim
is checked by :mod:`workers.chat.policy` (its shape is verified here, a list
of strings, so every service sees well-formed claims).

:func:`mint_token` issues tokens (``zrpc token create`` uses it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import jwt

from zrpc.status import RpcError, Status

if TYPE_CHECKING:
    from zrpc.config import Interceptor
    from zrpc.context import RequestContext

__all__ = [
    "TOKEN_EXPIRED_MESSAGE",
    "JwtAuthenticator",
    "expiry_delay",
    "mint_token",
    "require_identity",
]

#: What a connection is closed with when its token expires.
TOKEN_EXPIRED_MESSAGE = "token expired; reconnect with a fresh token"
_SYMMETRIC = ("HS256", "HS384", "HS512")
_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
               "ES256", "ES384", "ES512", "EdDSA")


class JwtAuthenticator:
    """Verify the HELLO ``token`` as a JWT (see the module docstring).

    Exactly one of ``secret`` (HMAC, default algorithm HS256) or
    ``public_key`` (PEM text of an RSA/EC/Ed25519 public key, default
    algorithms RS256 and ES256) is required. ``algorithms`` pins what is
    accepted; HMAC algorithms are refused with a public key and vice versa
    (no key-confusion), ``none`` is always refused. ``audience`` and
    ``issuer``, when set, must match the token's ``aud`` / ``iss``;
    ``leeway`` (seconds) tolerates clock skew on ``exp`` / ``nbf`` / ``iat``.
    ``require_exp`` (default True) refuses a token without an ``exp`` claim:
    such a token would be valid forever, and a connection using it would
    never be closed for expiry.
    """

    def __init__(self, secret: str | bytes | None = None, public_key: str | bytes | None = None,
                 algorithms: Sequence[str] | None = None, audience: str | None = None,
                 issuer: str | None = None, leeway: float = 0, allow_anonymous: bool = True,
                 require_exp: bool = True) -> None:
        if (secret is None) == (public_key is None):
            raise ValueError("JwtAuthenticator needs exactly one of secret or public_key")
        if secret is not None and not secret:
            raise ValueError("the JWT secret must not be empty")
        if algorithms is None:
            algorithms = ("HS256",) if secret is not None else ("RS256", "ES256")
        algs = tuple(algorithms)
        if not algs:
            raise ValueError("at least one JWT algorithm is required")
        allowed = _SYMMETRIC if secret is not None else _ASYMMETRIC
        for alg in algs:
            if alg not in allowed:
                kind = "a secret (HMAC)" if secret is not None else "a public key"
                raise ValueError(f"JWT algorithm {alg!r} cannot be used with {kind}; "
                                 f"choose from {', '.join(allowed)}")
        if leeway < 0:
            raise ValueError("leeway must be >= 0")
        self._key: Any = secret if secret is not None else _load_public_key(public_key)
        self.algorithms = algs
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.allow_anonymous = allow_anonymous
        self.require_exp = require_exp

    def __call__(self, hello: dict[str, Any], peer: Any) -> tuple[str | None, dict[str, Any]]:
        token = hello.get("token")
        if token is None:
            if self.allow_anonymous:
                return None, {}
            raise RpcError(Status.UNAUTHENTICATED, "authentication required: send a token in HELLO "
                                                   "(zrpc --token / ZRPC_TOKEN)")
        if not isinstance(token, str) or not token:
            raise RpcError(Status.UNAUTHENTICATED, "invalid token: HELLO 'token' must be a "
                                                   "non-empty string")
        claims = self.verify(token)
        return claims["sub"], claims

    def verify(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``; raises RpcError(UNAUTHENTICATED) with the reason."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _unauthenticated(f"not a valid JWT ({exc})") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise _unauthenticated(f"algorithm {alg!r} is not accepted "
                                   f"(expected {', '.join(self.algorithms)})")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._key, algorithms=list(self.algorithms), audience=self.audience,
                issuer=self.issuer, leeway=self.leeway,
                options={"require": ["sub", "exp"] if self.require_exp else ["sub"]})
        except jwt.ExpiredSignatureError:
            raise _unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError:
            raise _unauthenticated("token not yet valid (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise _unauthenticated(f"token audience does not match (expected {self.audience!r})"
                                   if self.audience else
                                   "token has an audience (aud) but the server expects none") from None
        except jwt.InvalidIssuerError:
            raise _unauthenticated(f"token issuer does not match (expected {self.issuer!r})") from None
        except jwt.InvalidSignatureError:
            raise _unauthenticated("token signature does not verify (signed with another key?)") from None
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim == "exp":
                raise _unauthenticated("token has no 'exp' claim: this server accepts only tokens "
                                       "that expire (mint one with an expiry)") from None
            raise _unauthenticated(f"token has no {exc.claim!r} claim") from None
        except jwt.InvalidAlgorithmError as exc:
            raise _unauthenticated(f"algorithm not accepted ({exc})") from None
        except jwt.PyJWTError as exc:
            raise _unauthenticated(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # e.g. a key that does not fit the algorithm
            raise _unauthenticated(f"token cannot be verified ({type(exc).__name__})") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _unauthenticated("token 'sub' must be a non-empty string")
        rooms = claims.get("rooms")
        if rooms is not None and (not isinstance(rooms, list)
                                  or not all(isinstance(r, str) for r in rooms)):
            raise _unauthenticated("token 'rooms' claim must be a list of strings")
        return claims


def _unauthenticated(why: str) -> RpcError:
    return RpcError(Status.UNAUTHENTICATED, f"invalid token: {why}")


def _load_public_key(key: str | bytes | None) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = key.encode() if isinstance(key, str) else key
    assert data is not None
    try:
        return load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"public key is not a PEM public key: {exc}") from None


def expiry_delay(authenticator: Any, claims: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds until a connection authenticated with ``claims`` must be closed, or None.

    Only for authenticators that enforce expiry (those with a ``leeway``
    attribute, such as :class:`JwtAuthenticator`); ``exp`` plus the leeway.
    """
    leeway = getattr(authenticator, "leeway", None)
    exp = claims.get("exp") if claims else None
    if leeway is None or isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    now = time.time() if now is None else now
    return max(0.0, exp + leeway - now)


def require_identity(exempt: Iterable[str] = ("Health/",)) -> Interceptor:
    """An interceptor refusing anonymous callers (UNAUTHENTICATED) except for ``exempt`` prefixes.

    Use it with an authenticator on the in-process server::

        ServerConfig(authenticator=JwtAuthenticator(secret=...), interceptors=(require_identity(),))
    """
    prefixes = tuple(exempt)

    async def interceptor(context: RequestContext) -> None:
        if context.identity is None and not context.method.startswith(prefixes):
            raise RpcError(Status.UNAUTHENTICATED,
                           f"{context.method} requires authentication: connect with a token "
                           "(zrpc --token / ZRPC_TOKEN) or a client certificate")

    return interceptor


def mint_token(secret: str | bytes, user: str, rooms: Sequence[str] | None = None,
               ttl_s: float = 3600, algorithm: str = "HS256", audience: str | None = None,
               issuer: str | None = None) -> str:
    """A signed JWT for ``user`` (``sub``) valid ``ttl_s`` seconds, optionally limited to ``rooms``.

    ``secret`` is the HMAC secret, or the PEM private key for RS*/ES*/EdDSA.
    """
    if not user:
        raise ValueError("user must not be empty")
    if algorithm not in _SYMMETRIC + _ASYMMETRIC:
        raise ValueError(f"unsupported JWT algorithm {algorithm!r}")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + int(ttl_s)}
    if rooms is not None:
        claims["rooms"] = list(rooms)
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    key: Any = secret
    if algorithm not in _SYMMETRIC:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(secret.encode() if isinstance(secret, str) else secret, None)
    return jwt.encode(claims, key, algorithm=algorithm)
