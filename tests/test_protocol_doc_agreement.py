"""Where docs/protocol.md and the server once disagreed, they now agree (end to end).

The sans-IO side of the same points (malformed HELLOs, header check order,
late frames, GOAWAY ids) is in the conformance vectors
(tests/vectors/protocol.json, run by tests/test_protocol_vectors.py).
"""

from __future__ import annotations

import asyncio
import pathlib
import ssl
from typing import Any

import msgpack
import pytest
import uvloop

import zrpc
from zrpc.protocol.connection import Connection, Role
from zrpc.protocol.events import HelloReceived, MessageReceived
from zrpc.protocol.frames import FrameDecoder, FrameType, encode_frame
from zrpc.status import Status

T = 10.0


async def started_server(home: pathlib.Path, **config: Any) -> tuple[zrpc.Server, int]:
    server = zrpc.Server(zrpc.ServerConfig(**config) if config else None)
    svc = zrpc.Service("Big")

    @svc.unary("Get", request=dict, response=dict)
    async def get(request: Any, ctx: zrpc.RequestContext) -> Any:
        return {"blob": "x" * 5000}

    server.add_service(svc)
    server.bind("127.0.0.1:0", zrpc.TlsConfig.development(home))
    (_, port), *_ = await server.start()
    return server, port


def client_context(home: pathlib.Path, alpn: list[str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(zrpc.TlsConfig.development(home).ca_file))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def first_frames(port: int, ctx: ssl.SSLContext, send: bytes = b"") -> tuple[list[Any], bool]:
    """Connect, send ``send``, read until the server closes (or T); (frames, closed by server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="localhost")
    try:
        if send:
            writer.write(send)
        data = b""
        try:
            async with asyncio.timeout(2):
                while chunk := await reader.read(65536):
                    data += chunk
            closed = True
        except TimeoutError:
            closed = False
        return FrameDecoder(2**32 - 1).feed(data), closed
    finally:
        writer.close()


@pytest.mark.parametrize("alpn", [None, ["h2"], ["http/1.1", "h2"]], ids=["none", "h2", "http"])
def test_a_tls_client_without_zrpc_alpn_is_refused(tmp_path: pathlib.Path,
                                                   alpn: list[str] | None) -> None:
    async def main() -> None:
        server, port = await started_server(tmp_path)
        try:
            frames, closed = await first_frames(port, client_context(tmp_path, alpn))
            assert closed
            [(ftype, _, sid, payload)] = frames
            last, code, message = msgpack.unpackb(payload)
            assert (ftype, sid, last, code) == (FrameType.GOAWAY, 0, 0, Status.FAILED_PRECONDITION)
            assert "zrpc/1" in message
        finally:
            await server.shutdown(0)
    uvloop.run(main())


def test_a_tls_client_with_zrpc_alpn_gets_the_hello(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        server, port = await started_server(tmp_path)
        try:
            c = Connection(Role.CLIENT)
            c.send_hello()
            frames, closed = await first_frames(port, client_context(tmp_path, ["h2", "zrpc/1"]),
                                                c.data_to_send())
            assert not closed and [f[0] for f in frames] == [FrameType.HELLO]
        finally:
            await server.shutdown(0)
    uvloop.run(main())


def test_compression_is_not_negotiated(tmp_path: pathlib.Path) -> None:
    """A server with compression on compresses for any client; clients always inflate."""
    async def main() -> None:
        server, port = await started_server(
            tmp_path, stream_config=zrpc.StreamConfig(enable_compression=True,
                                                     compression_threshold=100))
        try:
            c = Connection(Role.CLIENT)
            c.send_hello()  # nothing in it about compression
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(tmp_path, ["zrpc/1"]),
                server_hostname="localhost")
            try:
                writer.write(c.data_to_send())
                events: list[Any] = []
                async with asyncio.timeout(T):
                    while not any(isinstance(e, HelloReceived) for e in events):
                        events += c.receive_data(await reader.read(65536))
                    sid = c.open_stream("Big/Get")
                    c.send_message(sid, msgpack.packb({}), end_stream=True)
                    writer.write(c.data_to_send())
                    while not any(isinstance(e, MessageReceived) for e in events):
                        events += c.receive_data(await reader.read(65536))
                [msg] = [e for e in events if isinstance(e, MessageReceived)]
                assert msg.compressed and len(msg.payload) < 5000
            finally:
                writer.close()
            async with zrpc.Client() as client:  # the reference client inflates it
                await client.connect(f"127.0.0.1:{port}", zrpc.TlsConfig.development(tmp_path))
                assert await client.unary("Big/Get", {}, dict) == {"blob": "x" * 5000}
        finally:
            await server.shutdown(0)
    uvloop.run(main())


def test_final_goaway_keeps_the_graceful_id_over_quic_ordering_too() -> None:
    """Over QUIC OPENs arrive in any order: ids up to the GOAWAY's still run, above are refused,
    and the final GOAWAY names the graceful one's id, not the highest id seen."""
    s = Connection(Role.SERVER)
    s.stream_ids_in_order = False
    hello = {"version": 1, "max_message_size": 4194304, "max_concurrent_streams": 1024,
             "initial_stream_window": 262144, "initial_connection_window": 4194304,
             "max_metadata_size": 16384}
    s.receive_data(encode_frame(FrameType.HELLO, 0, 0, msgpack.packb(hello)))
    s.send_hello()

    def open_(sid: int) -> bytes:
        return encode_frame(FrameType.OPEN, 0, sid, msgpack.packb(["Svc/M", None, {}]))

    s.receive_data(open_(5))
    s.goaway()
    s.data_to_send()
    assert len(s.receive_data(open_(3))) == 1  # in flight on its own QUIC stream: it runs
    s.receive_data(open_(7))  # above the GOAWAY: refused
    s.close(Status.UNAVAILABLE, "grace period over")
    frames = FrameDecoder(2**32 - 1).feed(s.data_to_send())
    assert [(f[0], f[2]) for f in frames] == [(FrameType.RESET, 7), (FrameType.GOAWAY, 0)]
    assert msgpack.unpackb(frames[-1][3])[:2] == [5, Status.UNAVAILABLE]
