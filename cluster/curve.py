"""CurveZMQ on the cluster's tcp:// links: key sets, socket roles, ZAP authentication.

Role
----
Between hosts the broker and its workers talk over two kinds of ZeroMQ
links: the broker's ROUTER (workers' DEALERs connect) and each worker's PUB
bus (the brokers' SUB connects). With a cluster key set every such ``tcp://``
link is encrypted and mutually authenticated with CurveZMQ: the binding side
is the Curve server, the connecting side the Curve client, and the server
side admits only public keys listed in the key set's ``authorized/``
directory, through a ZAP handler (pyzmq's :mod:`zmq.auth` authenticator);
any other key is refused with a warning naming it; a peer that fails the
handshake before that (plaintext, or a wrong server key) is logged too, from
the socket's monitor (:meth:`CurveGuard.on_monitor_event`). ``ipc://`` links stay as
they are (filesystem permissions guard them).

The key set
-----------
``zrpc-broker keys create DIR`` (:func:`create_keys`) writes::

    DIR/broker.key_secret   the brokers' key pair   (broker hosts only)
    DIR/broker.key          its public half          (every host)
    DIR/worker.key_secret   the workers' key pair    (worker hosts only)
    DIR/worker.key          its public half
    DIR/authorized/         public keys admitted on the links (every host):
                            broker.key, worker.key

A broker loads ``broker.key_secret``, a worker ``worker.key_secret``; a
worker also needs ``broker.key`` (the server key of the brokers' ROUTER), and
a broker learns each worker bus's public key from its (authenticated) READY.
``keys create DIR --name NAME`` adds another worker key pair (one per host,
say) to an existing set, admitted by copying ``NAME.key`` into every host's
``authorized/``.

Refusing plaintext
------------------
:func:`check_endpoint`: a ``tcp://`` endpoint on a non-loopback address
without keys is a configuration error unless the operator said
``--cluster-insecure``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

__all__ = ["ClusterKeys", "CurveGuard", "check_endpoint", "create_keys", "is_tcp"]

log = logging.getLogger("zrpc.cluster")

_ZAP_DOMAIN = "zrpc-cluster"


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def _is_loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, "*" or an interface: assume it reaches the network
        return False


def check_endpoint(option: str, endpoint: str, has_keys: bool, insecure: bool) -> None:
    """ValueError for a plaintext ``tcp://`` endpoint off loopback (unless ``insecure``)."""
    if not has_keys and not insecure and is_tcp(endpoint) and not _is_loopback(endpoint):
        raise ValueError(
            f"{option} {endpoint} is not a loopback address: cluster links must be encrypted "
            "(--cluster-keys DIR, from `zrpc-broker keys create DIR`), or say "
            "--cluster-insecure to run them in plaintext")


def create_keys(directory: str | Path, name: str = "") -> list[Path]:
    """Write a cluster key set into ``directory`` (see the module docstring); with ``name``,
    add one more worker key pair to an existing set. Returns the files written."""
    d = Path(directory)
    authorized = d / "authorized"
    names = [name] if name else ["broker", "worker"]
    if name and not (d / "broker.key").exists():
        raise ValueError(f"{d} holds no key set: create it first (without --name)")
    for n in names:
        if n in ("", "authorized") or "/" in n or n.startswith("."):
            raise ValueError(f"invalid key name {n!r}")
        if (d / f"{n}.key").exists() or (d / f"{n}.key_secret").exists():
            raise ValueError(f"{d / n}.key already exists: refusing to overwrite a key")
    d.mkdir(parents=True, exist_ok=True)
    authorized.mkdir(mode=0o755, exist_ok=True)
    written: list[Path] = []
    for n in names:
        public, secret = zmq.auth.create_certificates(str(d), n)
        os.chmod(secret, 0o600)
        shutil.copy(public, authorized / f"{n}.key")
        written += [Path(public), Path(secret), authorized / f"{n}.key"]
    return written


@dataclass(frozen=True)
class ClusterKeys:
    """One process's view of a key set: its own key pair, the brokers' public key,
    and the public keys it admits."""

    directory: str
    public: bytes
    secret: bytes
    broker_public: bytes
    authorized: frozenset[bytes]

    @classmethod
    def load(cls, directory: str | Path, role: str) -> ClusterKeys:
        """``role`` is ``"broker"`` or ``"worker"`` (whose ``.key_secret`` to use).
        ValueError naming the missing or unreadable file."""
        d = Path(directory)
        try:
            public, secret = zmq.auth.load_certificate(str(d / f"{role}.key_secret"))
            broker_public, _ = zmq.auth.load_certificate(str(d / "broker.key"))
            authorized = frozenset(
                zmq.auth.load_certificate(str(p))[0] for p in sorted((d / "authorized").glob("*.key")))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cluster key set {d}: {exc}") from None
        if secret is None:
            raise ValueError(f"cluster key set {d}: {role}.key_secret holds no secret key")
        if not authorized:
            raise ValueError(f"cluster key set {d}: no public key in {d / 'authorized'}")
        return cls(str(d), public, secret, broker_public, authorized)


class CurveGuard:
    """Applies the key set to one process's sockets and runs its ZAP authenticator."""

    def __init__(self, ctx: zmq.Context[Any], keys: ClusterKeys) -> None:
        self.keys = keys
        self.refused = 0
        self._logged: dict[bytes, float] = {}  # key -> when its refusal was last logged
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("zrpc.cluster.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(_ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP: admit a Curve client key listed in ``authorized/`` (runs in the ZAP thread)."""
        if client_key in self.keys.authorized:
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._logged.get(client_key, -1e9) < 60:  # a refused peer retries every 0.1 s
            return False
        if len(self._logged) > 1000:
            self._logged.clear()
        self._logged[client_key] = now
        log.warning("refused a cluster peer: its CurveZMQ public key %s is not in %s",
                    client_key.decode("ascii", "replace"),
                    os.path.join(self.keys.directory, "authorized"))
        return False

    def serve(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (about to bind a tcp:// endpoint) a Curve server."""
        sock.setsockopt(zmq.ZAP_DOMAIN, _ZAP_DOMAIN.encode())
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket[Any], server_public: bytes) -> None:
        """Make the next ``connect`` of ``sock`` a Curve client of ``server_public``."""
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_serverkey = server_public

    #: Socket-monitor events of a failed handshake, for :meth:`on_monitor_event`.
    HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                        | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def on_monitor_event(self, parts: list[bytes]) -> None:
        """A server socket's monitor reported a failed handshake: log it (once a minute)."""
        try:
            event = parse_monitor_message(parts)
        except (ValueError, IndexError):
            return
        reasons: dict[int, str] = {
            zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused by ZAP (unknown key)",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error (plaintext, or a wrong server key)",
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the connection failed during the handshake"}
        what = reasons.get(int(event["event"]), f"error {event['value']}")
        endpoint = event["endpoint"].decode("utf-8", "replace")
        tag = f"{endpoint}/{event['event']}".encode()
        now = time.monotonic()
        if now - self._logged.get(tag, -1e9) < 60:
            return
        self._logged[tag] = now
        self.refused += 1
        log.warning("a cluster peer failed the CurveZMQ handshake on %s: %s", endpoint, what)

    def close(self) -> None:
        self._auth.stop()
