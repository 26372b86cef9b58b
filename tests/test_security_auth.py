"""Authentication and authorisation: JWT tokens, the rooms claim, identity rules, expiry.

Against the in-process server (TLS on 127.0.0.1, port 0) and through a real
``zrpc-broker start --auth-secret`` with its chat workers. Nothing sleeps: the
expiry tests wait for the server to end the stream, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import pathlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt
import pytest
import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import zrpc
from cluster.sharding import shard_for
from procs import BIN, BrokerProc, env_for, start_broker
from workers.chat.policy import authorize_room, room_allowed
from workers.chat.service import ChatConfig, ChatService
from zrpc.auth import (
    JwtAuthenticator,
    expiry_delay,
    mint_token,
    require_identity,
)
from zrpc.chat import (
    BatchSummary,
    ChatResponse,
    ListUsersRequest,
    ListUsersResponse,
    Message,
    ResponseType,
    SubscribeRequest,
)
from zrpc.context import RequestContext
from zrpc.status import Status
from zrpc.tls import TlsConfig, issue_client_certificate

# The short test secret is the point of these tests, not a weakness to warn about.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

SECRET = "s3cret"
T = 10.0  # safety deadline of a single wait (never reached when the code is right)


def run(coro: Any) -> Any:
    return uvloop.run(coro)


def b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def alg_none_token(sub: str = "alice") -> str:
    """An unsigned token crafted by hand: header {"alg": "none"}, empty signature."""
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': sub, 'exp': int(time.time()) + 3600})}."


def ec_keypair() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


# ------------------------------------------------------------------ units


def test_authenticator_configuration_is_checked() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        JwtAuthenticator()
    with pytest.raises(ValueError, match="exactly one"):
        JwtAuthenticator(secret="a", public_key="b")
    with pytest.raises(ValueError, match="cannot be used with a secret"):
        JwtAuthenticator(secret="a", algorithms=("RS256",))
    with pytest.raises(ValueError, match="cannot be used with a public key"):
        JwtAuthenticator(public_key=ec_keypair()[1], algorithms=("HS256",))
    with pytest.raises(ValueError, match="cannot be used"):
        JwtAuthenticator(secret="a", algorithms=("none",))
    auth = JwtAuthenticator(secret="a")
    assert auth.algorithms == ("HS256",)
    assert JwtAuthenticator(public_key=ec_keypair()[1]).algorithms == ("RS256", "ES256")


def test_verify_accepts_good_tokens_and_names_what_is_wrong_with_bad_ones() -> None:
    auth = JwtAuthenticator(secret=SECRET, audience="zrpc", issuer="corp")
    good = mint_token(SECRET, "alice", rooms=["general"], audience="zrpc", issuer="corp")
    identity, claims = auth({"token": good}, None)
    assert identity == "alice" and claims["rooms"] == ["general"]
    assert auth({}, None) == (None, {})  # anonymous

    def refused(token: Any, auth: JwtAuthenticator = auth) -> str:
        with pytest.raises(zrpc.RpcError) as err:
            auth({"token": token}, None)
        assert err.value.status is Status.UNAUTHENTICATED
        return err.value.message

    assert "signature" in refused(mint_token("other", "alice", audience="zrpc", issuer="corp"))
    assert "expired" in refused(mint_token(SECRET, "alice", ttl_s=-60, audience="zrpc", issuer="corp"))
    assert "'none' is not accepted" in refused(alg_none_token())
    assert "audience" in refused(mint_token(SECRET, "alice", audience="other", issuer="corp"))
    assert "no 'aud' claim" in refused(mint_token(SECRET, "alice", issuer="corp"))
    assert "issuer" in refused(mint_token(SECRET, "alice", audience="zrpc", issuer="evil"))
    now = int(time.time())
    early = jwt.encode({"sub": "alice", "nbf": now + 600, "exp": now + 1200, "aud": "zrpc",
                        "iss": "corp"}, SECRET, algorithm="HS256")
    assert "not yet valid" in refused(early)
    no_sub = jwt.encode({"exp": now + 60, "aud": "zrpc", "iss": "corp"}, SECRET, algorithm="HS256")
    assert "'sub'" in refused(no_sub)
    bad_rooms = jwt.encode({"sub": "a", "rooms": "general", "aud": "zrpc", "iss": "corp",
                            "exp": now + 60}, SECRET, algorithm="HS256")
    assert "rooms" in refused(bad_rooms)
    assert "not a valid JWT" in refused("garbage")
    assert "non-empty string" in refused(12345)
    assert "non-empty string" in refused("")
    hs512 = jwt.encode({"sub": "a"}, SECRET, algorithm="HS512")
    assert "'HS512' is not accepted" in refused(hs512)
    strict = JwtAuthenticator(secret=SECRET, allow_anonymous=False)
    with pytest.raises(zrpc.RpcError) as err:
        strict({}, None)
    assert err.value.status is Status.UNAUTHENTICATED and "token" in err.value.message


def test_public_key_tokens_and_no_key_confusion() -> None:
    private, public = ec_keypair()
    auth = JwtAuthenticator(public_key=public)
    token = mint_token(private.decode(), "carol", algorithm="ES256")
    assert auth({"token": token}, None)[0] == "carol"
    # The classic confusion attack: HS256 "signed" with the public key as the HMAC secret.
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64({'sub': 'mallory'})}"
    mac = hmac.new(public, signing_input.encode(), "sha256").digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    with pytest.raises(zrpc.RpcError) as err:
        auth({"token": forged}, None)
    assert err.value.status is Status.UNAUTHENTICATED and "HS256" in err.value.message
    other_private, _ = ec_keypair()
    with pytest.raises(zrpc.RpcError) as err:
        auth({"token": mint_token(other_private, "carol", algorithm="ES256")}, None)
    assert "signature" in err.value.message


def test_rooms_claim_globs_and_authorize_room() -> None:
    assert room_allowed({}, "anything")
    assert room_allowed({"sub": "a"}, "anything")
    claims = {"rooms": ["general", "team-*", "[x]"]}
    assert room_allowed(claims, "general") and room_allowed(claims, "team-red")
    assert room_allowed(claims, "[x]")  # exact names win over glob syntax
    assert not room_allowed(claims, "generals") and not room_allowed(claims, "TEAM-red")
    assert not room_allowed({"rooms": []}, "general")
    assert not room_allowed({"rooms": "general"}, "general")  # malformed: nothing
    ctx = RequestContext(method="Chat/SendMessage", identity="bob", claims=claims)
    authorize_room(ctx, "team-blue")
    with pytest.raises(zrpc.RpcError) as err:
        authorize_room(ctx, "secret")
    assert err.value.status is Status.PERMISSION_DENIED
    assert "bob" in err.value.message and "'secret'" in err.value.message


def test_expiry_delay_only_for_expiring_authenticators() -> None:
    auth = JwtAuthenticator(secret=SECRET, leeway=5)
    assert expiry_delay(auth, {"exp": 1000}, now=990) == 15
    assert expiry_delay(auth, {"exp": 1000}, now=2000) == 0
    assert expiry_delay(auth, {}, now=0) is None
    assert expiry_delay(lambda h, p: ("x", {}), {"exp": 1000}, now=0) is None  # a plain function
    assert expiry_delay(auth, {"exp": True}, now=0) is None


def test_require_identity_interceptor() -> None:
    check = require_identity()

    async def main() -> None:
        await check(RequestContext(method="Health/Check"))
        await check(RequestContext(method="Chat/SendMessage", identity="alice"))
        with pytest.raises(zrpc.RpcError) as err:
            await check(RequestContext(method="Chat/SendMessage"))
        assert err.value.status is Status.UNAUTHENTICATED
        assert "Chat/SendMessage requires authentication" in err.value.message
    run(main())


# ------------------------------------------------------------------ in-process server


@contextlib.asynccontextmanager
async def auth_server(tmp_path: pathlib.Path, authenticator: Any,
                      tls: TlsConfig | None = None, **config: Any) -> AsyncIterator[str]:
    service = ChatService(ChatConfig(data_dir=str(tmp_path / "data")))
    cfg = zrpc.ServerConfig(authenticator=authenticator, interceptors=(require_identity(),),
                            shutdown_grace_ms=0, **config)
    server = zrpc.Server(cfg)
    server.add_service(service.build())
    server.bind("127.0.0.1:0", tls or TlsConfig.development())
    (host, port), *_ = await server.start()
    try:
        yield f"{host}:{port}"
    finally:
        await server.shutdown(0)
        await service.close()


async def connect(address: str, token: str | None = None, tls: TlsConfig | None = None) -> zrpc.Client:
    c = zrpc.Client(zrpc.ClientConfig(token=token, connect_timeout_ms=int(T * 1000)))
    await c.connect(address, tls or TlsConfig.development())
    return c


async def refused_connect(address: str, token: str | None, tls: TlsConfig | None = None) -> str:
    with pytest.raises(zrpc.RpcError) as err:
        c = await connect(address, token, tls)
        await c.close()
    assert err.value.status is Status.UNAUTHENTICATED, err.value
    return err.value.message


async def send(c: zrpc.Client, room: str, user: str, text: str) -> Message:
    ack = await c.unary("Chat/SendMessage", Message(user=user, content=text, room=room),
                        ChatResponse, timeout=T)
    assert ack.type is ResponseType.ack and ack.message is not None
    return ack.message


async def status_of(coro: Any) -> zrpc.RpcError:
    with pytest.raises(zrpc.RpcError) as err:
        await coro
    return err.value


async def check_room_rules(c: zrpc.Client, allowed: str, denied: str, user: str) -> None:
    """Every chat method refuses ``denied`` with PERMISSION_DENIED and accepts ``allowed``."""
    stored = await send(c, allowed, "whoever", "hi")
    assert stored.user == user
    err = await status_of(send(c, denied, "whoever", "no"))
    assert err.status is Status.PERMISSION_DENIED and repr(denied) in err.message
    sub = await c.server_stream("Chat/SubscribeToRoom", SubscribeRequest(room=denied, user="x"),
                                ChatResponse, timeout=T)
    assert (await status_of(sub.next())).status is Status.PERMISSION_DENIED
    err = await status_of(c.unary("Chat/ListUsers", ListUsersRequest(room=denied),
                                  ListUsersResponse, timeout=T))
    assert err.status is Status.PERMISSION_DENIED
    both = await c.bidirectional_stream("Chat/JoinChat", Message, ChatResponse, timeout=T)
    await both.send(Message(user="x", room=denied))
    assert (await status_of(both.receive())).status is Status.PERMISSION_DENIED
    batch = await c.client_stream("Chat/SendMessageBatch", Message, BatchSummary, timeout=T)
    await batch.send(Message(user="x", content="ok", room=allowed))
    await batch.send(Message(user="x", content="no", room=denied))
    err = await status_of(batch.close_and_receive())
    assert err.status is Status.PERMISSION_DENIED and err.details == {"index": 1}
    users = await c.unary("Chat/ListUsers", ListUsersRequest(room=allowed), ListUsersResponse,
                          timeout=T)
    assert users.room == allowed


def test_in_process_anonymous_health_only_and_identity_from_sub(tmp_path: pathlib.Path) -> None:
    auth = JwtAuthenticator(secret=SECRET)

    async def main() -> None:
        async with auth_server(tmp_path, auth) as address:
            anon = await connect(address)
            assert await anon.unary("Health/Check", {}, dict) == {"status": "SERVING"}
            for method, body in (("Chat/SendMessage", Message(user="a", content="x", room="r")),
                                 ("Reflection/List", {})):
                err = await status_of(anon.unary(method, body, dict, timeout=T))
                assert err.status is Status.UNAUTHENTICATED and "requires authentication" in err.message
            await anon.close()
            c = await connect(address, mint_token(SECRET, "alice", rooms=["general", "team-*"]))
            await check_room_rules(c, "team-red", "secret", "alice")
            assert (await send(c, "general", "mallory", "hello")).user == "alice"
            await c.close()
            for token in (mint_token("other-key", "alice"), mint_token(SECRET, "alice", ttl_s=-5),
                          alg_none_token(), "not.a.token"):
                await refused_connect(address, token)
    run(main())


def test_in_process_wrong_audience_and_issuer(tmp_path: pathlib.Path) -> None:
    auth = JwtAuthenticator(secret=SECRET, audience="chat", issuer="corp")

    async def main() -> None:
        async with auth_server(tmp_path, auth) as address:
            assert "audience" in await refused_connect(
                address, mint_token(SECRET, "a", audience="billing", issuer="corp"))
            assert "issuer" in await refused_connect(
                address, mint_token(SECRET, "a", audience="chat", issuer="evil"))
            c = await connect(address, mint_token(SECRET, "a", audience="chat", issuer="corp"))
            assert (await send(c, "r", "x", "ok")).user == "a"
            await c.close()
    run(main())


def test_in_process_token_expiry_ends_long_lived_streams(tmp_path: pathlib.Path) -> None:
    auth = JwtAuthenticator(secret=SECRET)

    async def main() -> None:
        async with auth_server(tmp_path, auth) as address:
            c = await connect(address, mint_token(SECRET, "alice", ttl_s=2))
            sub = await c.server_stream("Chat/SubscribeToRoom",
                                        SubscribeRequest(room="general", user="x"), ChatResponse)
            first = await asyncio.wait_for(sub.next(), T)
            assert first is not None and first.type is ResponseType.user_joined
            err = await status_of(asyncio.wait_for(sub.next(), T))
            assert err.status is Status.UNAUTHENTICATED
            assert "token expired; reconnect with a fresh token" in err.message
            with pytest.raises(zrpc.RpcError):
                await c.unary("Health/Check", {}, dict, timeout=T)  # the connection is gone
            await c.close()
    run(main())


def test_mtls_identity_is_the_certificate_cn(tmp_path: pathlib.Path) -> None:
    dev = TlsConfig.development()
    server_tls = TlsConfig(cert_file=dev.cert_file, key_file=dev.key_file, ca_file=dev.ca_file,
                           require_client_cert=True)
    cert, key = issue_client_certificate("carol")
    client_tls = TlsConfig(cert_file=str(cert), key_file=str(key), ca_file=dev.ca_file)

    async def main() -> None:
        # No authenticator: the certificate's CN is the identity.
        async with auth_server(tmp_path / "a", None, server_tls) as address:
            c = await connect(address, tls=client_tls)
            assert (await send(c, "r", "mallory", "hi")).user == "carol"
            await c.close()
        # With an authenticator: a token's sub wins, no token keeps the certificate's CN.
        async with auth_server(tmp_path / "b", JwtAuthenticator(secret=SECRET), server_tls) as address:
            c = await connect(address, tls=client_tls)
            assert (await send(c, "r", "mallory", "hi")).user == "carol"
            await c.close()
            c = await connect(address, mint_token(SECRET, "dave"), tls=client_tls)
            assert (await send(c, "r", "mallory", "hi")).user == "dave"
            await c.close()
    run(main())


# ------------------------------------------------------------------ through the broker


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProc]:
    home = tmp_path_factory.mktemp("auth-broker")
    b = start_broker(home, "--auth-secret", SECRET, app=None)
    try:
        yield b.wait_ready()
    finally:
        b.stop()


def broker_tls(b: BrokerProc) -> TlsConfig:
    return TlsConfig.development(pathlib.Path(b.env["ZRPC_HOME"]))


def rooms_by_shard() -> dict[int, str]:
    found: dict[int, str] = {}
    i = 0
    while len(found) < 2:
        found.setdefault(shard_for(f"team-{i}", 2), f"team-{i}")
        i += 1
    return found


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_broker_anonymous_health_only_identity_and_rooms(auth_broker: BrokerProc) -> None:
    tls = broker_tls(auth_broker)
    address = auth_broker.address
    rooms = rooms_by_shard()

    async def main() -> None:
        anon = await connect(address, tls=tls)
        assert await anon.unary("Health/Check", {}, dict) == {"status": "SERVING"}
        for method, body in (("Chat/SendMessage", Message(user="a", content="x", room="r")),
                             ("Chat/ListUsers", ListUsersRequest(room="r")), ("Reflection/List", {})):
            err = await status_of(anon.unary(method, body, dict, timeout=T))
            assert err.status is Status.UNAUTHENTICATED and "requires authentication" in err.message
        await anon.close()
        c = await connect(address, mint_token(SECRET, "alice", rooms=["general", "team-*"]), tls)
        await check_room_rules(c, rooms[0], "secret", "alice")
        # a batch spanning both shards (the worker forwards through the broker) is alice's
        batch = await c.client_stream("Chat/SendMessageBatch", Message, BatchSummary, timeout=T)
        for room in (rooms[0], rooms[1], rooms[0]):
            await batch.send(Message(user="mallory", content=f"to {room}", room=room))
        summary = await batch.close_and_receive()
        assert summary.total_messages == 3 and summary.users == ["alice"]
        sub = await c.server_stream("Chat/SubscribeToRoom",
                                    SubscribeRequest(room=rooms[1], user="x", since_id=0), ChatResponse)
        first = await asyncio.wait_for(sub.next(), T)
        assert first is not None and first.message is not None
        assert first.message.user == "alice" and first.message.content == f"to {rooms[1]}"
        await c.close()
        forever = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")  # no exp: refused
        for token in (mint_token("other-key", "alice"), mint_token(SECRET, "alice", ttl_s=-5),
                      alg_none_token(), "x.y.z", forever):
            await refused_connect(address, token, tls)
    run(main())


def test_tokens_without_exp_are_refused_unless_allowed() -> None:
    forever = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    with pytest.raises(zrpc.RpcError) as err:
        JwtAuthenticator(secret=SECRET)({"token": forever}, None)
    assert err.value.status is Status.UNAUTHENTICATED and "no 'exp' claim" in err.value.message
    assert JwtAuthenticator(secret=SECRET, require_exp=False)({"token": forever}, None)[0] == "alice"
    # zrpc-broker start: on by default with auth, --auth-allow-no-exp turns it off
    from cli.broker_cmd import _authenticator, start
    auth = _authenticator(SECRET, None, None, None, 0.0)
    assert auth is not None and auth.require_exp
    auth = _authenticator(SECRET, None, None, None, 0.0, require_exp=False)
    assert auth is not None and not auth.require_exp
    opts = {o.name: o for o in start.params}
    assert opts["auth_require_exp"].default is True
    assert "--auth-allow-no-exp" in opts["auth_require_exp"].secondary_opts


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_broker_closes_streams_when_the_token_expires(auth_broker: BrokerProc) -> None:
    tls = broker_tls(auth_broker)

    async def main() -> None:
        c = await connect(auth_broker.address, mint_token(SECRET, "erin", ttl_s=2), tls)
        sub = await c.server_stream("Chat/SubscribeToRoom",
                                    SubscribeRequest(room="lobby", user="x"), ChatResponse)
        first = await asyncio.wait_for(sub.next(), T)
        assert first is not None and first.type is ResponseType.user_joined
        assert first.user_joined == "erin"
        err = await status_of(asyncio.wait_for(sub.next(), T))
        assert err.status is Status.UNAUTHENTICATED
        assert err.message == "token expired; reconnect with a fresh token"
        await c.close()
        # a fresh token works again
        c = await connect(auth_broker.address, mint_token(SECRET, "erin"), tls)
        assert (await send(c, "lobby", "x", "back")).user == "erin"
        await c.close()
    run(main())


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_cli_token_create_works_with_send(auth_broker: BrokerProc) -> None:
    env = env_for(pathlib.Path(auth_broker.env["ZRPC_HOME"]))
    env["ZRPC_AUTH_SECRET"] = SECRET
    env.pop("ZRPC_TOKEN", None)
    made = subprocess.run([str(BIN / "zrpc"), "token", "create", "--user", "frank", "--rooms",
                           "general,ops-*", "--ttl", "600"], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    token = made.stdout.strip()
    assert made.stdout == token + "\n" and token.count(".") == 2
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "frank" and claims["rooms"] == ["general", "ops-*"]
    assert 590 <= claims["exp"] - claims["iat"] <= 600

    def zrpc_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "zrpc"), "--server", auth_broker.address, *args], env=env,
                              capture_output=True, text=True, timeout=60)

    sent = zrpc_cli("--json", "--token", token, "send", "--room", "ops-1", "--user", "zed", "hi")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["user"] == "frank"
    denied = zrpc_cli("--token", token, "send", "--room", "secret", "--user", "zed", "hi")
    assert denied.returncode == 4 and "PERMISSION_DENIED" in denied.stderr
    anonymous = zrpc_cli("send", "--room", "general", "--user", "zed", "hi")
    assert anonymous.returncode == 4 and "UNAUTHENTICATED" in anonymous.stderr
    assert zrpc_cli("health").returncode == 0
    missing = subprocess.run([str(BIN / "zrpc"), "token", "create", "--user", "x"],
                             env={k: v for k, v in env.items() if k != "ZRPC_AUTH_SECRET"},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--secret" in missing.stderr


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_broker_with_public_key_and_audience(tmp_path: pathlib.Path) -> None:
    private, public = ec_keypair()
    (tmp_path / "pub.pem").write_bytes(public)
    (tmp_path / "key.pem").write_bytes(private)
    b = start_broker(tmp_path, "--auth-public-key", str(tmp_path / "pub.pem"),
                     "--auth-audience", "chat", app=None)
    try:
        b.wait_ready()
        tls = broker_tls(b)

        async def main() -> None:
            good = mint_token(private, "gina", algorithm="ES256", audience="chat")
            c = await connect(b.address, good, tls)
            assert (await send(c, "r", "x", "hi")).user == "gina"
            await c.close()
            assert "audience" in await refused_connect(
                b.address, mint_token(private, "gina", algorithm="ES256", audience="other"), tls)
            assert "HS256" in await refused_connect(b.address, mint_token(SECRET, "gina",
                                                                           audience="chat"), tls)
        run(main())
        env = env_for(tmp_path)
        made = subprocess.run([str(BIN / "zrpc"), "token", "create", "--user", "hal", "--private-key",
                               str(tmp_path / "key.pem"), "--audience", "chat"], env=env,
                              capture_output=True, text=True, timeout=60, check=True)
        assert jwt.get_unverified_header(made.stdout.strip())["alg"] == "ES256"
        sent = subprocess.run([str(BIN / "zrpc"), "--server", b.address, "--json", "--token",
                               made.stdout.strip(), "send", "-r", "r", "-u", "x", "hi"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["user"] == "hal"
    finally:
        b.stop()
    assert "authentication is off" not in b.output()


def test_broker_cli_refuses_conflicting_auth_options(tmp_path: pathlib.Path) -> None:
    from click.testing import CliRunner

    from cli.broker_cmd import main

    (tmp_path / "pub.pem").write_bytes(ec_keypair()[1])
    runner = CliRunner()
    both = runner.invoke(main, ["start", "--auth-secret", "x", "--auth-public-key",
                                str(tmp_path / "pub.pem")])
    assert both.exit_code == 2 and "mutually exclusive" in both.output
    aud = runner.invoke(main, ["start", "--auth-audience", "x"])
    assert aud.exit_code == 2 and "--auth-audience" in aud.output
