"""zrpc over QUIC: the sans-IO stream mux, hostile QUIC peers, and a lossy network.

The end-to-end call patterns over QUIC run in ``test_framework_e2e.py`` (every
scenario there is parametrized over TLS/TCP, QUIC and memory). Here: the
mapping rules of ``docs/protocol.md`` ("zrpc over QUIC") on the sans-IO
:class:`StreamMux`, a fuzz of QUIC stream frames into the zrpc layer, raw
aioquic peers that break the rules against a real server (each must get a
clear status or a closed connection and leave the server serving), and a
user-space UDP proxy that drops 5 % of the datagrams and reorders some.
Loopback only; waits are events or polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import uvloop
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from conftest import make_echo_service
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zrpc
from zrpc.protocol.connection import Connection, Role
from zrpc.protocol.events import ConnectionTerminated, StreamOpened, StreamReset
from zrpc.protocol.frames import FrameDecoder, FrameType, encode_frame
from zrpc.protocol.quic import StreamMux, quic_stream_id, zrpc_stream_id
from zrpc.status import ProtocolError, Status
from zrpc.tls import ALPN_PROTOCOL

F = FrameType
MiB = 1024 * 1024
HELLO = {"version": 1, "max_message_size": 4 * MiB, "max_concurrent_streams": 1024,
         "initial_stream_window": 256 * 1024, "initial_connection_window": 4 * MiB,
         "max_metadata_size": 16384, "user_agent": "quic-test"}


def frame(ftype: FrameType, sid: int, body: Any = None, flags: int = 0, raw: bytes | None = None) -> bytes:
    payload = raw if raw is not None else (b"" if body is None else msgpack.packb(body))
    return encode_frame(ftype, flags, sid, payload)


def server_mux() -> StreamMux:
    return StreamMux(False, 4 * MiB, 64 * 1024, 8 * MiB)


# ------------------------------------------------------------------ sans-IO mux


def test_stream_id_mapping() -> None:
    assert [quic_stream_id(s) for s in (0, 1, 3, 5)] == [0, 4, 8, 12]
    assert [zrpc_stream_id(q) for q in (0, 4, 8, 12)] == [0, 1, 3, 5]


def test_split_routes_frames_per_quic_stream_and_finishes_closed_streams() -> None:
    mux = server_mux()
    mux.receive(0, frame(F.HELLO, 0, HELLO), False)
    mux.receive(4, frame(F.OPEN, 1, ["E/S", None, {}]), False)
    mux.receive(8, frame(F.OPEN, 3, ["E/S", None, {}]), False)
    out = (frame(F.HELLO, 0, HELLO) + frame(F.MESSAGE, 1, raw=b"a") + frame(F.MESSAGE, 3, raw=b"b")
           + frame(F.STATUS, 1, [0, "", None]) + frame(F.PONG, 0, raw=b"12345678"))
    writes = mux.split(out)
    assert writes == [
        (0, frame(F.HELLO, 0, HELLO) + frame(F.PONG, 0, raw=b"12345678"), False),
        (4, frame(F.MESSAGE, 1, raw=b"a") + frame(F.STATUS, 1, [0, "", None]), True),
        (8, frame(F.MESSAGE, 3, raw=b"b"), False),
    ]
    # nothing more is written on a finished stream
    assert mux.split(frame(F.WINDOW, 1, raw=b"\0\0\0\1")) == []
    # the client finishes its side too: the stream's state is gone
    assert mux.receive(4, b"", True) == b""
    assert mux.open_streams == 2


def test_receive_returns_complete_frames_of_each_stream_in_any_interleaving() -> None:
    mux = server_mux()
    a = frame(F.OPEN, 1, ["E/S", None, {}]) + frame(F.MESSAGE, 1, raw=b"x" * 100)
    b = frame(F.OPEN, 3, ["E/S", None, {}]) + frame(F.MESSAGE, 3, raw=b"y" * 100)
    got = mux.receive(8, b[:7], False) + mux.receive(4, a[:50], False)
    got += mux.receive(8, b[7:], False) + mux.receive(4, a[50:], False)
    assert mux.buffered == 0
    frames = FrameDecoder(4 * MiB).feed(got)
    assert [(t, s) for t, _, s, _ in frames] == [(F.OPEN, 1), (F.OPEN, 3), (F.MESSAGE, 3), (F.MESSAGE, 1)]


def test_out_of_order_opens_are_accepted_by_the_connection_in_quic_mode() -> None:
    conn = Connection(Role.SERVER)
    conn.stream_ids_in_order = False
    conn.receive_data(frame(F.HELLO, 0, HELLO))
    events = conn.receive_data(frame(F.OPEN, 5, ["E/S", None, {}]) + frame(F.OPEN, 1, ["E/S", None, {}]))
    assert [type(e) for e in events] == [StreamOpened, StreamOpened]
    # a live id opened twice is still a connection error
    events = conn.receive_data(frame(F.OPEN, 1, ["E/S", None, {}]))
    assert isinstance(events[-1], ConnectionTerminated)


@pytest.mark.parametrize(("quic_id", "data", "what"), [
    (4, frame(F.OPEN, 3, ["E/S", None, {}]), "carries stream 1"),        # id does not match
    (4, frame(F.MESSAGE, 1, raw=b"x"), "OPEN must be its first frame"),  # no OPEN first
    (4, frame(F.OPEN, 1, ["E/S", None, {}]) * 2, "OPEN must be its first frame"),
    (4, frame(F.PING, 1, raw=b"12345678"), "PING frame on QUIC stream 4"),
    (0, frame(F.OPEN, 0, ["E/S", None, {}]), "OPEN frame on QUIC stream 0"),
    (2, b"x", "client-initiated bidirectional"),                          # unidirectional stream
    (0, frame(F.HELLO, 0, HELLO) + b"", "the peer finished the control stream"),
])
def test_mapping_violations_are_connection_errors(quic_id: int, data: bytes, what: str) -> None:
    mux = server_mux()
    with pytest.raises(ProtocolError, match=what):
        mux.receive(quic_id, data, quic_id == 0)


def test_fin_inside_a_frame_and_too_much_buffered_are_connection_errors() -> None:
    mux = server_mux()
    with pytest.raises(ProtocolError, match="inside a frame"):
        mux.receive(4, frame(F.OPEN, 1, ["E/S", None, {}])[:-1], True)
    mux = StreamMux(False, 4 * MiB, 64 * 1024, 1 * MiB)
    header = frame(F.OPEN, 1, ["E/S", None, {}]) + encode_frame(F.MESSAGE, 0, 1, b"x" * (3 * MiB))
    mux.receive(4, header[: 1000 * 1024], False)
    with pytest.raises(ProtocolError, match="incomplete frames") as err:
        mux.receive(4, header[1000 * 1024: 1100 * 1024], False)
    assert err.value.code is Status.RESOURCE_EXHAUSTED


def test_quic_resets_and_early_fins_become_zrpc_resets() -> None:
    mux = server_mux()
    conn = Connection(Role.SERVER)
    conn.stream_ids_in_order = False
    conn.receive_data(mux.receive(0, frame(F.HELLO, 0, HELLO), False))
    conn.receive_data(mux.receive(4, frame(F.OPEN, 1, ["E/S", None, {}]), False))
    conn.receive_data(mux.receive(8, frame(F.OPEN, 3, ["E/S", None, {}]), False))
    # RESET_STREAM with a zrpc status as its application error code
    events = conn.receive_data(mux.stream_reset(4, int(Status.DEADLINE_EXCEEDED)))
    assert events == [StreamReset(1, Status.DEADLINE_EXCEEDED, "stream reset by the peer (QUIC)")]
    # FIN before the zrpc stream closed: CANCELLED
    events = conn.receive_data(mux.receive(8, b"", True))
    assert [(type(e), e.stream_id, e.code) for e in events] == [(StreamReset, 3, Status.CANCELLED)]
    # our FINs are owed on both streams
    assert sorted(mux.split(b"")) == [(4, b"", True), (8, b"", True)]
    assert mux.open_streams == 1


# ------------------------------------------------------------------------ fuzz

_stream_frames = st.lists(st.tuples(
    st.sampled_from([0, 4, 8, 12, 2, 1]),
    st.one_of(
        st.binary(max_size=40),
        st.builds(lambda t, s, p: encode_frame(t, 0, s, p),
                  st.sampled_from(list(FrameType)), st.sampled_from([0, 1, 3, 5, 7]), st.binary(max_size=24)),
        st.just(frame(F.OPEN, 1, ["E/S", None, {}])),
        st.just(frame(F.HELLO, 0, HELLO)),
        st.just(frame(F.MESSAGE, 1, raw=msgpack.packb({"a": 1}), flags=2)),
    ),
    st.booleans(),
), max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_stream_frames)
def test_fuzzed_quic_stream_frames_never_crash_the_zrpc_layer(chunks: list[tuple[int, bytes, bool]]) -> None:
    mux = server_mux()
    conn = Connection(Role.SERVER)
    conn.stream_ids_in_order = False
    for quic_id, data, fin in chunks:
        try:
            frames = mux.receive(quic_id, data, fin)
        except ProtocolError as exc:
            assert exc.code in (Status.INTERNAL, Status.RESOURCE_EXHAUSTED)
            return  # a connection error: the glue closes the QUIC connection
        conn.receive_data(frames)  # never raises on peer input
        if conn.closed:
            return
        for write_id, _, _ in mux.split(conn.data_to_send()):
            assert write_id % 4 == 0


# ---------------------------------------------------------- live server helpers


@asynccontextmanager
async def quic_server(config: zrpc.ServerConfig | None = None) -> AsyncIterator[tuple[zrpc.Server, int]]:
    server = zrpc.Server(config)
    server.add_service(make_echo_service())
    server.bind_quic("127.0.0.1:0", zrpc.TlsConfig.development())
    await server.start()
    try:
        yield server, server.quic_addresses[0][1]
    finally:
        await server.shutdown(grace=1)


class RawQuic(QuicConnectionProtocol):
    """A raw aioquic client: writes whatever it likes on any stream, records what comes back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: dict[int, bytearray] = {}
        self.fins: set[int] = set()
        self.terminated: asyncio.Future[qe.ConnectionTerminated] = self._loop.create_future()
        self.handshake: asyncio.Future[None] = self._loop.create_future()

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.StreamDataReceived):
            self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
            if event.end_stream:
                self.fins.add(event.stream_id)
        elif isinstance(event, qe.HandshakeCompleted) and not self.handshake.done():
            self.handshake.set_result(None)
        elif isinstance(event, qe.ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result(event)
            if not self.handshake.done():
                self.handshake.set_exception(ConnectionError(event.reason_phrase))

    def send(self, quic_id: int, data: bytes, fin: bool = False) -> None:
        self._quic.send_stream_data(quic_id, data, end_stream=fin)
        self.transmit()

    def frames(self, quic_id: int) -> list[tuple[int, int, int, bytes]]:
        return FrameDecoder(4 * MiB).feed(bytes(self.received.get(quic_id, b"")))


@asynccontextmanager
async def raw_quic(port: int, alpn: str = ALPN_PROTOCOL) -> AsyncIterator[RawQuic]:
    loop = asyncio.get_running_loop()
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name="localhost")
    cfg.load_verify_locations(cafile=zrpc.TlsConfig.development().ca_file)
    quic = QuicConnection(configuration=cfg)
    transport, proto = await loop.create_datagram_endpoint(lambda: RawQuic(quic), local_addr=("127.0.0.1", 0))
    try:
        proto.connect(("127.0.0.1", port))
        await asyncio.wait_for(proto.handshake, 10)
        yield proto
    finally:
        proto.close()
        transport.close()


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def still_serving(port: int) -> None:
    client = zrpc.Client()
    await client.connect(f"quic://127.0.0.1:{port}", zrpc.TlsConfig.development())
    try:
        assert await client.unary("Echo/Say", {"ok": 1}, timeout=10) == {"ok": 1}
    finally:
        await client.close()


# -------------------------------------------------------------- hostile peers


def test_raw_peer_gets_answers_and_statuses_over_quic_streams() -> None:
    async def main() -> None:
        async with quic_server() as (_, port), raw_quic(port) as raw:
            raw.send(0, frame(F.HELLO, 0, HELLO))
            raw.send(4, frame(F.OPEN, 1, ["Echo/Say", None, {}])
                     + frame(F.MESSAGE, 1, raw=msgpack.packb({"x": 1}), flags=2))
            raw.send(8, frame(F.OPEN, 3, ["No/Such", None, {}]), fin=False)
            await until(lambda: 4 in raw.fins and 8 in raw.fins, what="both streams finished")
            assert [f[0] for f in raw.frames(0)] == [F.HELLO]
            s1 = raw.frames(4)
            assert [f[0] for f in s1] == [F.MESSAGE, F.STATUS]
            assert msgpack.unpackb(s1[0][3]) == {"x": 1} and msgpack.unpackb(s1[1][3])[0] == 0
            (status,) = raw.frames(8)
            assert status[0] == F.STATUS and msgpack.unpackb(status[3])[0] == Status.UNIMPLEMENTED
            await still_serving(port)
    uvloop.run(main())


@pytest.mark.parametrize(("steps", "code"), [
    ([(4, frame(F.OPEN, 1, ["Echo/Say", None, {}]))], Status.INTERNAL),       # stream before HELLO
    ([(0, frame(F.HELLO, 0, HELLO)), (4, frame(F.MESSAGE, 1, raw=b"x"))], Status.INTERNAL),
    ([(0, frame(F.HELLO, 0, HELLO)), (8, frame(F.OPEN, 1, ["Echo/Say", None, {}]))], Status.INTERNAL),
    ([(0, frame(F.HELLO, 0, HELLO)), (0, b"\x00\x00\x00\x01\x63\x00\x00\x00\x00\x00x")], Status.INTERNAL),
    ([(0, frame(F.HELLO, 0, HELLO)), (2, b"uni")], Status.INTERNAL),
    ([(0, frame(F.HELLO, 0, HELLO)), (4, encode_frame(F.OPEN, 0, 1, b"\x81" * 70_000))],
     Status.RESOURCE_EXHAUSTED),
])
def test_mapping_violations_close_the_quic_connection_with_the_status(
        steps: list[tuple[int, bytes]], code: Status) -> None:
    async def main() -> None:
        async with quic_server() as (_, port):
            async with raw_quic(port) as raw:
                for quic_id, data in steps:
                    raw.send(quic_id, data)
                ev = await asyncio.wait_for(raw.terminated, 10)
                assert ev.error_code == code, ev
            await still_serving(port)
    uvloop.run(main())


def test_quic_reset_stream_cancels_the_handler() -> None:
    async def main() -> None:
        cancelled = asyncio.Event()
        svc = zrpc.Service("Hang")

        @svc.unary("Forever", request=dict, response=dict)
        async def forever(request: Any, ctx: zrpc.RequestContext) -> Any:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()

        async with quic_server() as (server, port), raw_quic(port) as raw:
            server.add_service(svc)
            raw.send(0, frame(F.HELLO, 0, HELLO))
            raw.send(4, frame(F.OPEN, 1, ["Hang/Forever", None, {}])
                     + frame(F.MESSAGE, 1, raw=msgpack.packb({}), flags=2))
            await until(lambda: any(s.calls for s in server.sessions), what="the call to start")
            raw._quic.reset_stream(4, int(Status.CANCELLED))
            raw.transmit()
            await asyncio.wait_for(cancelled.wait(), 10)
            await until(lambda: 4 in raw.fins, what="the server to finish its side")
    uvloop.run(main())


def test_a_peer_ignoring_zrpc_credit_is_stopped_at_the_stream_window() -> None:
    """QUIC's own credit would let it through (aioquic grows it as data arrives): zrpc's holds."""
    async def main() -> None:
        svc = zrpc.Service("Stall")

        @svc.client_stream("Never", request=dict, response=dict)
        async def never(call: zrpc.ServerCall) -> Any:
            await asyncio.Event().wait()  # never reads: nothing is consumed, no credit returns

        async with quic_server() as (server, port), raw_quic(port) as raw:
            server.add_service(svc)
            raw.send(0, frame(F.HELLO, 0, HELLO))
            message = frame(F.MESSAGE, 1, raw=msgpack.packb({"p": "x" * 8000}))
            raw.send(4, frame(F.OPEN, 1, ["Stall/Never", None, {}]) + message * 40)  # 320 KB > 256 KiB
            ev = await asyncio.wait_for(raw.terminated, 10)
            assert ev.error_code == Status.RESOURCE_EXHAUSTED and "window exceeded" in ev.reason_phrase, ev
            await still_serving(port)
    uvloop.run(main())


def test_handshake_without_hello_is_closed_after_handshake_timeout() -> None:
    async def main() -> None:
        cfg = zrpc.ServerConfig(handshake_timeout_ms=300)
        async with quic_server(cfg) as (server, port), raw_quic(port) as raw:
            ev = await asyncio.wait_for(raw.terminated, 10)
            assert ev.error_code == Status.DEADLINE_EXCEEDED
            await until(lambda: not server._quic[0].connections, what="the connection to be dropped")
    uvloop.run(main())


def test_idle_connection_is_closed_with_the_goaway_reason() -> None:
    async def main() -> None:
        async with quic_server(zrpc.ServerConfig(idle_timeout_ms=400)) as (server, port), raw_quic(port) as raw:
            raw.send(0, frame(F.HELLO, 0, HELLO))
            raw.send(4, frame(F.OPEN, 1, ["Echo/Say", None, {}])
                     + frame(F.MESSAGE, 1, raw=msgpack.packb({"x": 1}), flags=2))
            ev = await asyncio.wait_for(raw.terminated, 10)  # one call, then idle: closed
            assert ev.error_code == Status.OK and "idle_timeout_ms (400)" in ev.reason_phrase, ev
            goaways = [msgpack.unpackb(f[3]) for f in raw.frames(0) if f[0] == F.GOAWAY]
            assert goaways and goaways[-1][0] == 1 and "idle_timeout_ms (400)" in goaways[-1][2]
            await until(lambda: not server.sessions and not server._quic[0].connections,
                        what="the server to drop the connection")
    uvloop.run(main())


def test_wrong_alpn_fails_the_handshake() -> None:
    async def main() -> None:
        async with quic_server() as (_, port):
            with pytest.raises((ConnectionError, TimeoutError, ssl.SSLError)):
                async with raw_quic(port, alpn="h3"):
                    pass
            await still_serving(port)
    uvloop.run(main())


def test_client_config_transport_picks_the_adapter_for_addresses_without_a_scheme() -> None:
    async def main() -> None:
        from zrpc.quic import QuicPipe

        async with quic_server() as (_, port):
            client = zrpc.Client(zrpc.ClientConfig(transport="quic"))
            await client.connect(f"127.0.0.1:{port}", zrpc.TlsConfig.development())
            try:
                assert isinstance(client._transport, QuicPipe)
                assert await client.unary("Echo/Say", {"t": 1}, timeout=10) == {"t": 1}
            finally:
                await client.close()
            # an explicit scheme wins: zrpc:// is TLS over TCP, which this UDP port does not serve
            tcp = zrpc.Client(zrpc.ClientConfig(transport="quic", connect_timeout_ms=3000))
            with pytest.raises(zrpc.RpcError):
                await tcp.connect(f"zrpc://127.0.0.1:{port}", zrpc.TlsConfig.development())
        with pytest.raises(ValueError, match="transport"):
            zrpc.ClientConfig(transport="udp")  # type: ignore[arg-type]
    uvloop.run(main())


def test_the_quic_pipe_is_a_zrpc_transport() -> None:
    async def main() -> None:
        from zrpc.quic import QuicPipe
        from zrpc.transport import Transport

        async with quic_server() as (server, port):
            client = zrpc.Client()
            await client.connect(f"quic://127.0.0.1:{port}", zrpc.TlsConfig.development())
            try:
                assert isinstance(client._transport, QuicPipe) and isinstance(client._transport, Transport)
                (proto,) = server._quic[0].connections
                assert isinstance(proto.pipe, Transport)
                assert proto.pipe.get_extra_info("peername")[0] == "127.0.0.1"
                assert proto.pipe.get_extra_info("ssl_object") is None
            finally:
                await client.close()
    uvloop.run(main())


def test_max_connections_counts_quic_connections() -> None:
    async def main() -> None:
        async with quic_server(zrpc.ServerConfig(max_connections=1)) as (_, port):
            first = zrpc.Client()
            await first.connect(f"quic://127.0.0.1:{port}", zrpc.TlsConfig.development())
            second = zrpc.Client(zrpc.ClientConfig(connect_timeout_ms=5000))
            with pytest.raises(zrpc.RpcError) as err:
                await second.connect(f"quic://127.0.0.1:{port}", zrpc.TlsConfig.development())
            assert err.value.status is Status.UNAVAILABLE
            assert await first.unary("Echo/Say", {"a": 1}) == {"a": 1}
            await first.close()
    uvloop.run(main())


# ------------------------------------------------------------- lossy network


class LossyUdpProxy(asyncio.DatagramProtocol):
    """Forwards datagrams between one client and a server, dropping and reordering some."""

    def __init__(self, target: tuple[str, int], loss: float, reorder: float, seed: int) -> None:
        self.target = target
        self.loss = loss
        self.reorder = reorder
        self.rng = random.Random(seed)
        self.client: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.upstream: asyncio.DatagramTransport | None = None
        self.held: list[tuple[bytes, bool]] = []
        self.dropped = self.reordered = self.forwarded = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client = addr
        self._forward(data, to_server=True)

    def from_server(self, data: bytes) -> None:
        self._forward(data, to_server=False)

    def _forward(self, data: bytes, to_server: bool) -> None:
        if self.rng.random() < self.loss:
            self.dropped += 1
            return
        if self.rng.random() < self.reorder:
            self.held.append((data, to_server))  # sent after the next datagram in either direction
            self.reordered += 1
            return
        self._send(data, to_server)
        held, self.held = self.held, []
        for d, up in held:
            self._send(d, up)

    def _send(self, data: bytes, to_server: bool) -> None:
        self.forwarded += 1
        if to_server:
            assert self.upstream is not None
            self.upstream.sendto(data)
        elif self.client is not None and self.transport is not None:
            self.transport.sendto(data, self.client)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, proxy: LossyUdpProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy.from_server(data)


@pytest.mark.timeout(120)
def test_every_stream_completes_in_order_through_5_percent_loss_and_reordering() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with quic_server() as (_, port):
            proxy = LossyUdpProxy(("127.0.0.1", port), loss=0.05, reorder=0.05, seed=14)
            ptransport, _ = await loop.create_datagram_endpoint(lambda: proxy, local_addr=("127.0.0.1", 0))
            up, _ = await loop.create_datagram_endpoint(lambda: _Upstream(proxy),
                                                        remote_addr=("127.0.0.1", port))
            proxy.upstream = up
            pport = ptransport.get_extra_info("sockname")[1]
            client = zrpc.Client(zrpc.ClientConfig(connect_timeout_ms=30_000))
            try:
                await client.connect(f"quic://127.0.0.1:{pport}", zrpc.TlsConfig.development())

                async def down(n: int) -> list[int]:
                    stream = await client.server_stream("Echo/Repeat", {"n": n}, timeout=60)
                    return [m["i"] async for m in stream]

                async def both(k: int) -> list[int]:
                    chat = await client.bidirectional_stream("Echo/Chat", timeout=60)
                    got = []
                    for i in range(50):
                        await chat.send({"k": k, "i": i, "pad": "x" * 1000})
                    await chat.close_send()
                    async for m in chat:
                        assert m["k"] == k
                        got.append(m["i"])
                    return got

                async def up_stream(k: int) -> list[int]:
                    s = await client.client_stream("Echo/Collect", timeout=60)
                    for i in range(50):
                        await s.send({"i": i, "pad": "y" * 1000})
                    reply = await s.close_and_receive()
                    return [m["i"] for m in reply["items"]]

                async with asyncio.timeout(90):
                    downs = await asyncio.gather(*(down(300) for _ in range(8)))
                    boths = await asyncio.gather(*(both(k) for k in range(8)))
                    ups = await asyncio.gather(*(up_stream(k) for k in range(8)))
                    unary = await asyncio.gather(*(client.unary("Echo/Say", {"u": i}, timeout=60)
                                                   for i in range(100)))
                assert downs == [list(range(300))] * 8
                assert boths == [list(range(50))] * 8
                assert ups == [list(range(50))] * 8
                assert unary == [{"u": i} for i in range(100)]
                assert proxy.dropped > 20 and proxy.reordered > 20, (proxy.dropped, proxy.reordered)
            finally:
                await client.close()
                ptransport.close()
                up.close()
    uvloop.run(main())


def test_client_address_change_mid_connection_is_followed() -> None:
    """NAT rebinding: the client's datagrams start coming from another port; calls go on."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with quic_server() as (server, port):
            proxy = LossyUdpProxy(("127.0.0.1", port), loss=0.0, reorder=0.0, seed=1)
            ptransport, _ = await loop.create_datagram_endpoint(lambda: proxy, local_addr=("127.0.0.1", 0))
            up, _ = await loop.create_datagram_endpoint(lambda: _Upstream(proxy), remote_addr=("127.0.0.1", port))
            proxy.upstream = up
            client = zrpc.Client()
            try:
                await client.connect(f"quic://127.0.0.1:{ptransport.get_extra_info('sockname')[1]}",
                                     zrpc.TlsConfig.development())
                assert await client.unary("Echo/Say", {"n": 1}, timeout=10) == {"n": 1}
                old = up.get_extra_info("sockname")
                up2, _ = await loop.create_datagram_endpoint(lambda: _Upstream(proxy),
                                                             remote_addr=("127.0.0.1", port))
                proxy.upstream = up2  # from now on the server sees the client at a new address
                up.close()
                assert up2.get_extra_info("sockname") != old
                got = await asyncio.gather(*(client.unary("Echo/Say", {"n": i}, timeout=10) for i in range(20)))
                assert got == [{"n": i} for i in range(20)]
                (proto,) = server._quic[0].connections
                assert proto.peer_address()[1] == up2.get_extra_info("sockname")[1]
            finally:
                await client.close()
                ptransport.close()
                proxy.upstream.close()
    uvloop.run(main())


# ------------------------------------------------------------ the broker's edge


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_broker_quic_listener_survives_hostile_peers_and_keeps_serving(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from procs import start_broker

    monkeypatch.setenv("ZRPC_HOME", str(tmp_path))  # the broker's development CA

    broker = start_broker(tmp_path, "--quic-listen", "127.0.0.1:0", "--workers", "1")
    try:
        broker.wait_ready()
        port = int(broker.info["quic"].rsplit(":", 1)[1])

        async def main() -> None:
            # mapping violations: each gets CONNECTION_CLOSE with its status
            for steps, code in [
                ([(4, frame(F.OPEN, 1, ["Echo/Say", None, {}]))], Status.INTERNAL),
                ([(0, frame(F.HELLO, 0, HELLO)), (4, frame(F.MESSAGE, 1, raw=b"x"))], Status.INTERNAL),
                ([(0, frame(F.HELLO, 0, HELLO)), (8, frame(F.OPEN, 1, ["Echo/Say", None, {}]))], Status.INTERNAL),
                ([(0, frame(F.HELLO, 0, {"version": 99}))], Status.FAILED_PRECONDITION),
            ]:
                async with raw_quic(port) as raw:
                    for quic_id, data in steps:
                        raw.send(quic_id, data)
                    ev = await asyncio.wait_for(raw.terminated, 10)
                    assert ev.error_code == code, (steps, ev)
            # a well-formed raw call through the edge to a worker, then a RESET_STREAM mid-call
            async with raw_quic(port) as raw:
                raw.send(0, frame(F.HELLO, 0, HELLO))
                raw.send(4, frame(F.OPEN, 1, ["Echo/Say", None, {}])
                         + frame(F.MESSAGE, 1, raw=msgpack.packb({"key": "a"}), flags=2))
                raw.send(8, frame(F.OPEN, 3, ["Echo/Sleep", None, {}])
                         + frame(F.MESSAGE, 3, raw=msgpack.packb({"key": "a", "seconds": 30}), flags=2))
                await until(lambda: 4 in raw.fins, what="the unary call to finish")
                kinds = [f[0] for f in raw.frames(4)]
                assert kinds == [F.MESSAGE, F.STATUS], kinds
                raw._quic.reset_stream(8, int(Status.CANCELLED))
                raw.transmit()
                await until(lambda: 8 in raw.fins, what="the edge to finish the reset stream")
            # fuzz: random bytes on random streams after a HELLO
            rng = random.Random(14)
            for _ in range(10):
                async with raw_quic(port) as raw:
                    raw.send(0, frame(F.HELLO, 0, HELLO))
                    for _ in range(5):
                        quic_id = rng.choice([0, 4, 8, 12])
                        with contextlib.suppress(ValueError, RuntimeError):  # it finished that stream
                            raw.send(quic_id, rng.randbytes(rng.randint(1, 64)), fin=rng.random() < 0.2)
                    with contextlib.suppress(ValueError, RuntimeError):
                        raw.send(0, frame(F.PING, 0, raw=b"pingping"))
                    with contextlib.suppress(TimeoutError):  # closed by the broker, or still open
                        await asyncio.wait_for(asyncio.shield(raw.terminated), 0.2)
            await still_serving_echo(port)

        uvloop.run(main())
        assert "Traceback" not in broker.output(), broker.output()[-3000:]
    finally:
        broker.stop()


async def still_serving_echo(port: int) -> None:
    client = zrpc.Client()
    await client.connect(f"quic://127.0.0.1:{port}", zrpc.TlsConfig.development())
    try:
        reply = await client.unary("Echo/Say", {"key": "z"}, timeout=10)
        assert reply["key"] == "z"
    finally:
        await client.close()


def test_a_second_connection_resumes_the_tls_session() -> None:
    async def main() -> None:
        from zrpc.quic import CLIENT_TICKETS

        CLIENT_TICKETS.clear()
        async with quic_server() as (_, port):
            resumed = []
            for _ in range(3):
                client = zrpc.Client()
                await client.connect(f"quic://127.0.0.1:{port}", zrpc.TlsConfig.development())
                try:
                    assert await client.unary("Echo/Say", {"n": 1}, timeout=10) == {"n": 1}
                    assert client._transport is not None
                    resumed.append(client._transport.get_extra_info("session_resumed"))
                finally:
                    await client.close()
            assert resumed == [False, True, True]
    uvloop.run(main())


def test_0rtt_data_is_held_until_the_handshake_completes_then_served() -> None:
    """A resumed raw client sends HELLO and a call as 0-RTT: the server holds them (a replay of
    them could not complete the handshake) and serves them once the handshake completes."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with quic_server() as (server, port):
            tickets: list[Any] = []
            cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_PROTOCOL], server_name="localhost")
            cfg.load_verify_locations(cafile=zrpc.TlsConfig.development().ca_file)
            first = QuicConnection(configuration=cfg, session_ticket_handler=tickets.append)
            t1, p1 = await loop.create_datagram_endpoint(lambda: RawQuic(first), local_addr=("127.0.0.1", 0))
            p1.connect(("127.0.0.1", port))
            await asyncio.wait_for(p1.handshake, 10)
            p1.send(0, frame(F.HELLO, 0, HELLO))
            await until(lambda: bool(tickets), what="a session ticket")
            p1.close()
            t1.close()

            cfg2 = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_PROTOCOL], server_name="localhost")
            cfg2.load_verify_locations(cafile=zrpc.TlsConfig.development().ca_file)
            cfg2.session_ticket = tickets[-1]
            second = QuicConnection(configuration=cfg2)
            t2, p2 = await loop.create_datagram_endpoint(lambda: RawQuic(second), local_addr=("127.0.0.1", 0))
            try:
                p2.connect(("127.0.0.1", port))
                p2.send(0, frame(F.HELLO, 0, HELLO))  # before the handshake: 0-RTT
                p2.send(4, frame(F.OPEN, 1, ["Echo/Say", None, {}])
                        + frame(F.MESSAGE, 1, raw=msgpack.packb({"early": 1}), flags=2))
                await until(lambda: 4 in p2.fins, what="the early call to be answered")
                assert second.tls.early_data_accepted and second.tls.session_resumed
                kinds = [(f[0], msgpack.unpackb(f[3])) for f in p2.frames(4)]
                assert kinds[0] == (F.MESSAGE, {"early": 1}) and kinds[1][0] == F.STATUS
                held = [p for p in server._quic[0].connections if p._early_bytes > 0]
                assert held, "the server did not see the data as 0-RTT"
            finally:
                p2.close()
                t2.close()
    uvloop.run(main())
