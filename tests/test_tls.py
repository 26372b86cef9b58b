"""Tests for zrpc.tls: development PKI, TLS contexts, mTLS and peer identity."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import pathlib
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zrpc.tls import (
    ALPN_PROTOCOL,
    DevMaterial,
    TlsConfig,
    ensure_development_ca,
    issue_client_certificate,
    peer_identity,
    zrpc_home,
)

IO_TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Belt and braces: nothing in this module may touch the real user home.
    monkeypatch.setenv("ZRPC_HOME", str(tmp_path / "default-home"))


def _read_all(material: DevMaterial) -> dict[str, bytes]:
    return {f.name: getattr(material, f.name).read_bytes() for f in dataclasses.fields(material)}


# --------------------------------------------------------------------------
# Handshake harness: a blocking TLS exchange over a connected socket pair.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    error: BaseException | None = None
    version: str | None = None
    alpn: str | None = None
    peer: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _serve_one(sock: socket.socket, ctx: ssl.SSLContext) -> Outcome:
    try:
        with ctx.wrap_socket(sock, server_side=True) as tls:
            tls.do_handshake()
            outcome = Outcome(
                version=tls.version(),
                alpn=tls.selected_alpn_protocol(),
                peer=peer_identity(tls),
            )
            if tls.recv(4) != b"ping":
                raise AssertionError("server did not receive ping")
            tls.sendall(b"pong")
            return outcome
    except (OSError, AssertionError) as exc:
        return Outcome(error=exc)
    finally:
        sock.close()


def _client_one(sock: socket.socket, ctx: ssl.SSLContext, hostname: str) -> Outcome:
    try:
        with ctx.wrap_socket(sock, server_hostname=hostname) as tls:
            tls.do_handshake()
            # With TLS 1.3 the server judges the client certificate after the
            # client finished its handshake: only a round trip proves acceptance.
            tls.sendall(b"ping")
            reply = tls.recv(4)
            if reply != b"pong":
                raise ConnectionError(f"no pong from server (got {reply!r})")
            return Outcome(version=tls.version(), alpn=tls.selected_alpn_protocol())
    except OSError as exc:  # ssl.SSLError and ConnectionError are OSErrors
        return Outcome(error=exc)
    finally:
        sock.close()


def handshake(
    server: TlsConfig, client: TlsConfig, hostname: str = "localhost"
) -> tuple[Outcome, Outcome]:
    server_ctx = server.server_context()
    client_ctx = client.client_context()
    assert server_ctx is not None and client_ctx is not None
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(IO_TIMEOUT)
    client_sock.settimeout(IO_TIMEOUT)
    with ThreadPoolExecutor(max_workers=1) as pool:
        server_future = pool.submit(_serve_one, server_sock, server_ctx)
        client_outcome = _client_one(client_sock, client_ctx, hostname)
        server_outcome = server_future.result(timeout=IO_TIMEOUT * 2)
    return server_outcome, client_outcome


# --------------------------------------------------------------------------
# zrpc_home
# --------------------------------------------------------------------------


def test_zrpc_home_prefers_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("ZRPC_HOME", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert zrpc_home() == tmp_path / "explicit"
    assert not (tmp_path / "explicit").exists()  # not created


def test_zrpc_home_xdg_then_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.delenv("ZRPC_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert zrpc_home() == tmp_path / "xdg" / "zrpc"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert zrpc_home() == tmp_path / "user" / ".local" / "share" / "zrpc"


# --------------------------------------------------------------------------
# Development material
# --------------------------------------------------------------------------


def test_development_material_created_once_and_reused(tmp_path: pathlib.Path) -> None:
    first = ensure_development_ca(tmp_path)
    assert first.server_cert.parent == tmp_path / "tls"
    before = _read_all(first)
    for path in (first.ca_key, first.server_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    second = ensure_development_ca(tmp_path)
    config = TlsConfig.development(tmp_path)
    assert second == first
    assert _read_all(second) == before
    assert config.cert_file == str(first.server_cert)
    assert config.key_file == str(first.server_key)
    assert config.ca_file == str(first.ca_cert)
    assert not list((tmp_path / "tls").glob("*.tmp"))


def test_development_certificates_content(tmp_path: pathlib.Path) -> None:
    material = ensure_development_ca(tmp_path)
    ca = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    ca_public = ca.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    assert isinstance(ca_public.curve, ec.SECP256R1)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= datetime.timedelta(days=3650)
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert datetime.timedelta(days=365) <= lifetime <= datetime.timedelta(days=366)
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


def test_concurrent_creation_yields_one_ca(tmp_path: pathlib.Path) -> None:
    barrier = threading.Barrier(4)

    def create() -> dict[str, bytes]:
        barrier.wait(timeout=IO_TIMEOUT)
        return _read_all(ensure_development_ca(tmp_path))

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [
            f.result(timeout=IO_TIMEOUT * 3) for f in [pool.submit(create) for _ in range(4)]
        ]
    assert all(r == results[0] for r in results)


def _replace_server_cert(material: DevMaterial, valid_for: datetime.timedelta) -> None:
    ca = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(material.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    original = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    san = original.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + valid_for)
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    material.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    material.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_server_cert_expiring_soon_is_regenerated(tmp_path: pathlib.Path) -> None:
    material = ensure_development_ca(tmp_path)
    _replace_server_cert(material, valid_for=datetime.timedelta(days=3))
    stale = material.server_cert.read_bytes()
    ca_before = material.ca_cert.read_bytes()

    ensure_development_ca(tmp_path)
    assert material.server_cert.read_bytes() != stale
    assert material.ca_cert.read_bytes() == ca_before  # CA is still good: kept
    fresh = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    remaining = fresh.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert remaining > datetime.timedelta(days=300)


def test_server_cert_valid_for_a_while_is_kept(tmp_path: pathlib.Path) -> None:
    material = ensure_development_ca(tmp_path)
    _replace_server_cert(material, valid_for=datetime.timedelta(days=30))
    current = material.server_cert.read_bytes()
    ensure_development_ca(tmp_path)
    assert material.server_cert.read_bytes() == current


# --------------------------------------------------------------------------
# Handshakes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
def test_development_handshake_tls13_with_alpn(tmp_path: pathlib.Path, hostname: str) -> None:
    config = TlsConfig.development(tmp_path)
    server, client = handshake(config, config, hostname)
    assert server.ok, server.error
    assert client.ok, client.error
    assert client.version == server.version == "TLSv1.3"
    assert client.alpn == server.alpn == ALPN_PROTOCOL == "zrpc/1"
    assert server.peer is None  # the dev client config presents no certificate


def test_hostname_mismatch_is_rejected(tmp_path: pathlib.Path) -> None:
    config = TlsConfig.development(tmp_path)
    _, client = handshake(config, config, hostname="example.com")
    assert isinstance(client.error, ssl.SSLCertVerificationError)


def test_client_with_other_dev_ca_fails_verification(tmp_path: pathlib.Path) -> None:
    server_config = TlsConfig.development(tmp_path / "server-home")
    client_config = TlsConfig.development(tmp_path / "other-home")
    server, client = handshake(server_config, client_config)
    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert client.error.verify_code != 0
    assert not server.ok


def test_contexts_require_tls13(tmp_path: pathlib.Path) -> None:
    config = TlsConfig.development(tmp_path)
    server_ctx, client_ctx = config.server_context(), config.client_context()
    assert server_ctx is not None and client_ctx is not None
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert client_ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert client_ctx.check_hostname and client_ctx.verify_mode == ssl.CERT_REQUIRED

    # A client capped at TLS 1.2 cannot talk to a zrpc server.
    legacy = ssl.create_default_context(cafile=config.ca_file)
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(IO_TIMEOUT)
    client_sock.settimeout(IO_TIMEOUT)
    with ThreadPoolExecutor(max_workers=1) as pool:
        server_future = pool.submit(_serve_one, server_sock, server_ctx)
        with pytest.raises(ssl.SSLError):
            try:
                with legacy.wrap_socket(client_sock, server_hostname="localhost") as tls:
                    tls.do_handshake()
            finally:
                client_sock.close()
        assert not server_future.result(timeout=IO_TIMEOUT * 2).ok


# --------------------------------------------------------------------------
# Mutual TLS
# --------------------------------------------------------------------------


def test_mtls_rejects_client_without_certificate(tmp_path: pathlib.Path) -> None:
    dev = TlsConfig.development(tmp_path)
    server_config = dataclasses.replace(dev, require_client_cert=True)
    # The dev config must not present the *server* pair as a client certificate:
    # the server has to complain about a missing certificate, not a bad one.
    server, client = handshake(server_config, dev)
    assert isinstance(server.error, ssl.SSLError)
    assert server.error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert not client.ok


def test_mtls_accepts_issued_client_certificate(tmp_path: pathlib.Path) -> None:
    dev = TlsConfig.development(tmp_path)
    server_config = dataclasses.replace(dev, require_client_cert=True)
    cert, key = issue_client_certificate("alice", tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    client_config = dataclasses.replace(dev, cert_file=str(cert), key_file=str(key))
    server, client = handshake(server_config, client_config)
    assert server.ok, server.error
    assert client.ok, client.error
    assert server.peer == "alice"
    assert server.version == "TLSv1.3"


def test_mtls_rejects_client_cert_from_other_ca(tmp_path: pathlib.Path) -> None:
    server_config = dataclasses.replace(
        TlsConfig.development(tmp_path / "a"), require_client_cert=True
    )
    cert, key = issue_client_certificate("mallory", tmp_path / "b")
    client_config = TlsConfig(cert_file=str(cert), key_file=str(key), ca_file=server_config.ca_file)
    server, client = handshake(server_config, client_config)
    assert isinstance(server.error, ssl.SSLCertVerificationError)
    assert not client.ok


def test_issue_client_certificate_reuses_and_separates_names(tmp_path: pathlib.Path) -> None:
    alice = issue_client_certificate("alice", tmp_path)
    again = issue_client_certificate("alice", tmp_path)
    bob = issue_client_certificate("bob", tmp_path)
    odd = issue_client_certificate("../evil name", tmp_path)
    assert alice == again
    assert alice[0].read_bytes() == again[0].read_bytes()
    assert bob[0] != alice[0]
    assert odd[0].parent == tmp_path / "tls" / "clients"
    cert = x509.load_pem_x509_certificate(odd[0].read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "../evil name"
    with pytest.raises(ValueError):
        issue_client_certificate("", tmp_path)


def test_asyncio_loopback_mtls(tmp_path: pathlib.Path) -> None:
    dev = TlsConfig.development(tmp_path)
    server_ctx = dataclasses.replace(dev, require_client_cert=True).server_context()
    cert, key = issue_client_certificate("bob", tmp_path)
    client_ctx = dataclasses.replace(dev, cert_file=str(cert), key_file=str(key)).client_context()
    assert server_ctx is not None and client_ctx is not None
    seen: dict[str, Any] = {}

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        seen["peer"] = peer_identity(ssl_object)
        seen["alpn"] = ssl_object.selected_alpn_protocol()
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    async def main() -> tuple[bytes, str | None]:
        server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1",
                port,
                ssl=client_ctx,
                server_hostname=dev.server_hostname or "localhost",
            )
            writer.write(b"zrpc")
            echoed = await reader.readexactly(4)
            version = writer.get_extra_info("ssl_object").version()
            writer.close()
            await writer.wait_closed()
        return echoed, version

    echoed, version = asyncio.run(asyncio.wait_for(main(), IO_TIMEOUT))
    assert echoed == b"zrpc"
    assert version == "TLSv1.3"
    assert seen == {"peer": "bob", "alpn": ALPN_PROTOCOL}


# --------------------------------------------------------------------------
# Errors, plaintext, peer_identity edge cases
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "build"),
    [
        ("cert_file", lambda cfg: cfg.server_context()),
        ("key_file", lambda cfg: cfg.server_context()),
        ("ca_file", lambda cfg: cfg.client_context()),
        ("cert_file", lambda cfg: cfg.client_context()),
    ],
)
def test_missing_file_gives_clear_error(
    tmp_path: pathlib.Path, option: str, build: Callable[[TlsConfig], object]
) -> None:
    material = ensure_development_ca(tmp_path)
    missing = tmp_path / f"missing-{option}.pem"
    base = TlsConfig(
        cert_file=str(material.server_cert),
        key_file=str(material.server_key),
        ca_file=str(material.ca_cert),
    )
    overrides: dict[str, Any] = {option: str(missing)}
    config = dataclasses.replace(base, **overrides)
    with pytest.raises(FileNotFoundError) as info:
        build(config)
    assert option in str(info.value)
    assert str(missing) in str(info.value)


def test_bad_pem_and_missing_options_give_clear_errors(tmp_path: pathlib.Path) -> None:
    material = ensure_development_ca(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="ca_file"):
        TlsConfig(ca_file=str(garbage)).client_context()
    with pytest.raises(ValueError, match="cert_file"):
        TlsConfig(cert_file=str(garbage), key_file=str(material.server_key)).server_context()
    with pytest.raises(ValueError, match="cert_file"):
        TlsConfig().server_context()
    with pytest.raises(ValueError, match="ca_file"):
        TlsConfig(
            cert_file=str(material.server_cert),
            key_file=str(material.server_key),
            require_client_cert=True,
        ).server_context()


def test_plaintext_configs_return_no_context(tmp_path: pathlib.Path) -> None:
    plain = TlsConfig.insecure_plaintext()
    assert plain == TlsConfig(plaintext=True)
    assert plain.server_context() is None
    assert plain.client_context() is None
    with pytest.raises(ValueError, match="plaintext"):
        TlsConfig(plaintext=True, cert_file=str(tmp_path / "x.crt"))
    with pytest.raises(ValueError, match="plaintext"):
        dataclasses.replace(TlsConfig.development(tmp_path), plaintext=True)


def test_default_config_uses_system_trust() -> None:
    ctx = TlsConfig().client_context()
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_peer_identity_without_verified_peer() -> None:
    assert peer_identity(None) is None
    ctx = ssl.create_default_context()
    with ctx.wrap_socket(
        socket.socket(), server_hostname="localhost", do_handshake_on_connect=False
    ) as unconnected:
        assert peer_identity(unconnected) is None
