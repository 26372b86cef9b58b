"""TLS configuration for zrpc connections.

This module is the single place where zrpc decides how a connection is
secured.  It provides:

* :class:`TlsConfig` - an immutable description of the TLS settings of one
  endpoint, which builds the :class:`ssl.SSLContext` used by a server
  (:meth:`TlsConfig.server_context`) or a client
  (:meth:`TlsConfig.client_context`).  Every context requires TLS 1.3 and
  negotiates the ``zrpc/1`` ALPN protocol.  Plaintext is only possible through
  the explicit :meth:`TlsConfig.insecure_plaintext` opt-in.
* A local *development* PKI (:func:`ensure_development_ca`,
  :meth:`TlsConfig.development`, :func:`issue_client_certificate`): a private
  CA plus a ``localhost`` server certificate created once under
  ``<zrpc home>/tls/`` so that development setups and tests get real,
  verified TLS without any manual certificate handling. Only servers create
  it: a client's default, :meth:`TlsConfig.client`, trusts the system store
  plus the development CA when one exists and never writes a file.
* :func:`peer_identity` - the common name of the verified peer certificate,
  used to identify mutually authenticated (mTLS) clients.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import os
import pathlib
import re
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ALPN_PROTOCOL",
    "DevMaterial",
    "TlsConfig",
    "development_ca_file",
    "ensure_development_ca",
    "issue_client_certificate",
    "peer_identity",
    "zrpc_home",
]

ALPN_PROTOCOL = "zrpc/1"

_CA_VALIDITY = datetime.timedelta(days=3650)
_LEAF_VALIDITY = datetime.timedelta(days=365)
_RENEW_BEFORE = datetime.timedelta(days=7)
_BACKDATE = datetime.timedelta(minutes=5)  # tolerate small clock skew between peers

_CA_CERT_NAME = "dev-ca.crt"
_CA_KEY_NAME = "dev-ca.key"
_SERVER_CERT_NAME = "dev-server.crt"
_SERVER_KEY_NAME = "dev-server.key"
_CLIENTS_DIR = "clients"
_LOCK_NAME = ".lock"

_KEY_MODE = 0o600
_CERT_MODE = 0o644


def zrpc_home() -> pathlib.Path:
    """Return the zrpc data directory.

    ``$ZRPC_HOME`` if set (and non-empty), else the user's data directory:
    ``$XDG_DATA_HOME/zrpc`` when ``$XDG_DATA_HOME`` is an absolute path, otherwise
    ``~/.local/share/zrpc``.  The directory is not created here.
    """
    explicit = os.environ.get("ZRPC_HOME")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):
        return pathlib.Path(xdg) / "zrpc"
    return pathlib.Path.home() / ".local" / "share" / "zrpc"


@dataclass(frozen=True)
class DevMaterial:
    """Paths of the development PKI files (see :func:`ensure_development_ca`)."""

    ca_cert: pathlib.Path
    ca_key: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings of one zrpc endpoint.

    ``cert_file``/``key_file`` are the server's certificate chain and key on the
    server side, and the optional client certificate (mutual TLS) on the client
    side.  ``ca_file`` is the CA bundle used to verify the peer: the server's
    certificate on the client side (system trust store when ``None``), client
    certificates on the server side when ``require_client_cert`` is set.
    ``server_hostname`` overrides the name used for SNI and certificate
    verification by clients; callers pass ``config.server_hostname or host`` to
    the connect call.  ``plaintext=True`` disables TLS entirely and must be
    requested explicitly (see :meth:`insecure_plaintext`).
    """

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    require_client_cert: bool = False
    server_hostname: str | None = None
    plaintext: bool = False
    #: Trust the system store in addition to ``ca_file`` (clients; see :meth:`client`).
    trust_system_store: bool = False
    # (cert_file, key_file) of the development *server* pair, set by
    # development(): that pair is never presented as a client certificate.
    _dev_server_pair: tuple[str, str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.plaintext:
            conflicting = [
                name
                for name in ("cert_file", "key_file", "ca_file", "server_hostname")
                if getattr(self, name) is not None
            ]
            if self.require_client_cert:
                conflicting.append("require_client_cert")
            if conflicting:
                raise ValueError(
                    "TlsConfig: plaintext=True disables TLS and cannot be combined with "
                    + ", ".join(conflicting)
                )
        if self.key_file is not None and self.cert_file is None:
            raise ValueError(f"TlsConfig: key_file={self.key_file!r} given without cert_file")

    @classmethod
    def development(cls, home: pathlib.Path | None = None) -> TlsConfig:
        """Config backed by the local development CA (created on first use).

        The same config works for a server (it presents the ``localhost``
        certificate) and for a client (it trusts the development CA and verifies
        the host name; it does not present the server certificate as a client
        certificate).
        """
        material = ensure_development_ca(home)
        cert, key = str(material.server_cert), str(material.server_key)
        return cls(
            cert_file=cert,
            key_file=key,
            ca_file=str(material.ca_cert),
            _dev_server_pair=(cert, key),
        )

    @classmethod
    def client(cls, home: pathlib.Path | None = None) -> TlsConfig:
        """A client's default: the system trust store plus the development CA if it exists.

        Reads ``<home>/tls/dev-ca.crt`` when present and never creates or
        writes anything (only servers create development certificates).
        """
        ca = development_ca_file(home)
        return cls(ca_file=str(ca) if ca.is_file() else None, trust_system_store=True)

    def trust_description(self) -> str:
        """What a client built from this config trusts, for error messages."""
        if self.ca_file is None:
            return f"the system trust store (no development CA at {development_ca_file()})"
        if self.trust_system_store:
            return f"the CA file {self.ca_file} and the system trust store"
        return f"the CA file {self.ca_file}"

    @classmethod
    def insecure_plaintext(cls) -> TlsConfig:
        """Explicit opt-in to unencrypted, unauthenticated connections."""
        return cls(plaintext=True)

    def server_context(self) -> ssl.SSLContext | None:
        """Build the server-side context, or ``None`` for a plaintext config."""
        if self.plaintext:
            return None
        if self.cert_file is None:
            raise ValueError("TlsConfig.server_context: cert_file (server certificate) is required")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols([ALPN_PROTOCOL])
        _load_cert_chain(ctx, self.cert_file, self.key_file)
        if self.require_client_cert:
            if self.ca_file is None:
                raise ValueError(
                    "TlsConfig.server_context: require_client_cert=True needs ca_file "
                    "(the CA that issues client certificates)"
                )
            # Deliberately not the system store: only the configured CA may
            # vouch for clients.
            _load_ca(ctx, self.ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext | None:
        """Build the client-side context, or ``None`` for a plaintext config."""
        if self.plaintext:
            return None
        if self.ca_file is not None:
            _require_file(self.ca_file, "ca_file")
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        except ssl.SSLError as exc:
            raise ValueError(
                f"TlsConfig: ca_file={self.ca_file!r} is not a valid PEM CA bundle: {exc}"
            ) from exc
        if self.ca_file is not None and self.trust_system_store:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols([ALPN_PROTOCOL])
        if self.cert_file is not None and (self.cert_file, self.key_file) != self._dev_server_pair:
            _load_cert_chain(ctx, self.cert_file, self.key_file)
        return ctx


def _require_file(path: str, option: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"TlsConfig: {option} not found: {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"TlsConfig: {option} is not a regular file: {path!r}")


def _load_cert_chain(ctx: ssl.SSLContext, cert_file: str, key_file: str | None) -> None:
    _require_file(cert_file, "cert_file")
    if key_file is not None:
        _require_file(key_file, "key_file")
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ValueError(
            f"TlsConfig: cannot load certificate cert_file={cert_file!r} with "
            f"key_file={key_file!r} (bad PEM or key does not match certificate): {exc}"
        ) from exc


def _load_ca(ctx: ssl.SSLContext, ca_file: str) -> None:
    _require_file(ca_file, "ca_file")
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ValueError(
            f"TlsConfig: ca_file={ca_file!r} is not a valid PEM CA bundle: {exc}"
        ) from exc


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """Common name of the *verified* peer certificate's subject, else ``None``.

    ``None`` is returned when there is no TLS, the handshake has not completed,
    the peer sent no certificate, or it was not verified (``getpeercert()``
    only reports verified certificates).  With several CN attributes the most
    specific (last) one wins.
    """
    if ssl_object is None:
        return None
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, OSError):  # handshake not done / not connected
        return None
    if not cert:
        return None
    subject = cert.get("subject", ())
    common_name: str | None = None
    if isinstance(subject, tuple):
        for rdn in subject:
            if not isinstance(rdn, tuple):
                continue
            for attribute in rdn:
                if (
                    isinstance(attribute, tuple)
                    and len(attribute) == 2
                    and attribute[0] == "commonName"
                    and attribute[1]
                ):
                    common_name = str(attribute[1])
    return common_name


# --------------------------------------------------------------------------
# Development PKI
# --------------------------------------------------------------------------


def ensure_development_ca(home: pathlib.Path | None = None) -> DevMaterial:
    """Create (once) and return the development CA and ``localhost`` server cert.

    Files live under ``<home>/tls/`` (``home`` defaults to :func:`zrpc_home`).
    Existing material is reused as long as it is valid; the server certificate
    is regenerated when missing, unreadable, not issued by the current CA, or
    expiring within 7 days (the CA likewise).  Safe against concurrent callers,
    including other processes: work happens under an exclusive ``flock`` and
    every file is written to a temporary file and atomically renamed.
    """
    tls_dir = _tls_dir(home)
    with _locked(tls_dir):
        material, _, _ = _ensure_material(tls_dir)
    return material


def issue_client_certificate(
    common_name: str, home: pathlib.Path | None = None
) -> tuple[pathlib.Path, pathlib.Path]:
    """Return ``(cert_path, key_path)`` of a client certificate for ``common_name``.

    The certificate is signed by the development CA (created if needed), is
    valid for client authentication only, and is stored under
    ``<home>/tls/clients/``.  A still-valid certificate previously issued for the
    same name by the current CA is reused.
    """
    if not isinstance(common_name, str) or not 1 <= len(common_name) <= 64:
        raise ValueError(f"client common name must be 1..64 characters, got {common_name!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in common_name):
        raise ValueError(f"client common name contains control characters: {common_name!r}")
    tls_dir = _tls_dir(home)
    clients_dir = tls_dir / _CLIENTS_DIR
    stem = _safe_file_stem(common_name)
    cert_path = clients_dir / f"{stem}.crt"
    key_path = clients_dir / f"{stem}.key"
    with _locked(tls_dir):
        _, ca_cert, ca_key = _ensure_material(tls_dir)
        clients_dir.mkdir(mode=0o700, exist_ok=True)
        existing = _load_pair(cert_path, key_path)
        if (
            existing is not None
            and _leaf_ok(existing[0], ca_cert)
            and (_common_name(existing[0]) == common_name)
        ):
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue_leaf(
            ca_cert,
            ca_key,
            key,
            common_name,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            san=None,
        )
        _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def development_ca_file(home: pathlib.Path | None = None) -> pathlib.Path:
    """Where the development CA certificate is (or would be); nothing is created."""
    base = pathlib.Path(home) if home is not None else zrpc_home()
    return base / "tls" / _CA_CERT_NAME


def _tls_dir(home: pathlib.Path | None) -> pathlib.Path:
    tls_dir = development_ca_file(home).parent
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return tls_dir


@contextlib.contextmanager
def _locked(tls_dir: pathlib.Path) -> Iterator[None]:
    fd = os.open(tls_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, _KEY_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _ensure_material(
    tls_dir: pathlib.Path,
) -> tuple[DevMaterial, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create/refresh the CA and server pair; the caller holds the lock."""
    material = DevMaterial(
        ca_cert=tls_dir / _CA_CERT_NAME,
        ca_key=tls_dir / _CA_KEY_NAME,
        server_cert=tls_dir / _SERVER_CERT_NAME,
        server_key=tls_dir / _SERVER_KEY_NAME,
    )
    ca = _load_pair(material.ca_cert, material.ca_key)
    if ca is None or not _ca_ok(ca[0]):
        ca = _new_ca()
        _write_pair(material.ca_cert, material.ca_key, *ca)
    ca_cert, ca_key = ca

    server = _load_pair(material.server_cert, material.server_key)
    if server is None or not _leaf_ok(server[0], ca_cert) or _san(server[0]) != _localhost_san():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue_leaf(
            ca_cert, ca_key, key, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, _localhost_san()
        )
        _write_pair(material.server_cert, material.server_key, cert, key)
    return material, ca_cert, ca_key


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _fresh(cert: x509.Certificate) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > _RENEW_BEFORE


def _ca_ok(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca and _fresh(cert)


def _leaf_ok(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    if not _fresh(cert):
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except Exception:  # ValueError, TypeError, InvalidSignature
        return False
    return True


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _localhost_san() -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[-1].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _load_pair(
    cert_path: pathlib.Path, key_path: pathlib.Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """Load a cert/key pair; ``None`` if missing, unreadable or mismatched."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        return None
    return cert, key


def _new_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix keeps CAs of different homes distinguishable in errors.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zrpc development"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"zrpc development CA {os.urandom(4).hex()}"),
        ]
    )
    now = _now()
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None,
) -> x509.Certificate:
    now = _now()
    not_after = min(now + _LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _write_pair(
    cert_path: pathlib.Path,
    key_path: pathlib.Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first: a reader never sees a new certificate next to an old key
    # for longer than the gap between the two renames.
    _atomic_write(key_path, key_pem, _KEY_MODE)
    _atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)


def _atomic_write(path: pathlib.Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _safe_file_stem(common_name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", common_name)
    if stem != common_name or stem.startswith("."):
        digest = hashlib.sha256(common_name.encode("utf-8")).hexdigest()[:12]
        stem = f"{stem.lstrip('.') or 'client'}-{digest}"
    return stem
