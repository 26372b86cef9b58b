"""Benchmark servers, one per process: ``python -m bench.servers KIND --ready-file F [...]``.

Kinds:

``zrpc``  the in-process zrpc server (``zrpc.Server`` on uvloop) serving ``Echo/*`` and ``Bench/Stream``.
``grpc``  the grpc.aio peer (:mod:`bench.grpc_peer`), on asyncio's default loop, or on uvloop
          with ``--loop uvloop`` (grpc.aio runs on both; the faster one is the one to beat).
``bare``  a bare uvloop TLS server, an ``asyncio.Protocol`` (the floor). The first byte a client
          sends picks the mode: ``E`` echo every byte back; ``S`` + 8-byte count: stream that many
          64-byte records; ``I`` (or nothing) hold the connection.
``zmq``   a raw pyzmq ROUTER echo on an ``ipc://`` endpoint (the broker<->worker hop's floor).

Each writes ``{"address"|"endpoint", "pid"}`` to the ready file once it serves,
and exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

from bench.common import raise_nofile


def _ready(path: str, info: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**info, "pid": os.getpid()}, f)
    os.replace(tmp, path)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# ----------------------------------------------------------------------- zrpc
async def serve_zrpc(args: argparse.Namespace) -> None:
    import dataclasses

    import zrpc
    from bench import apps

    # lift admission limits a loopback benchmark trips (whichever this version has)
    have = {f.name for f in dataclasses.fields(zrpc.ServerConfig)}
    limits: dict[str, Any] = {k: args.max_connections for k in ("max_connections", "max_connections_per_ip") if k in have}
    if "idle_timeout_ms" in have:
        limits["idle_timeout_ms"] = None
    server = zrpc.Server(zrpc.ServerConfig(**limits))
    for svc in apps.services():
        server.add_service(svc)
    server.bind("127.0.0.1:0", zrpc.TlsConfig.development())
    quic = hasattr(server, "bind_quic")  # zrpc over QUIC beside TLS/TCP (scenario 8), when this version has it
    if quic:
        server.bind_quic("127.0.0.1:0", zrpc.TlsConfig.development())
    (host, port), *_ = await server.start()
    info = {"address": f"{host}:{port}"}
    if quic:
        qhost, qport = server.quic_addresses[0]
        info["quic"] = f"quic://{qhost}:{qport}"
    _ready(args.ready_file, info)
    await _until_signal()
    await server.shutdown(1.0)


# ----------------------------------------------------------------------- grpc
async def serve_grpc(args: argparse.Namespace) -> None:
    from bench import grpc_peer
    from zrpc.tls import ensure_development_ca

    tls_dir = ensure_development_ca().server_cert.parent
    server = grpc_peer.build_server(grpc_peer.FanOut())
    port = server.add_secure_port("127.0.0.1:0", grpc_peer.server_credentials(tls_dir))
    await server.start()
    _ready(args.ready_file, {"address": f"127.0.0.1:{port}"})
    await _until_signal()
    await server.stop(0.5)


# ----------------------------------------------------------------------- bare
RECORD = b"r" * 64
_BLOCK = RECORD * 256


class BareProtocol(asyncio.Protocol):
    """Echo, stream 64-byte records, or hold: the least a TLS server on uvloop can do."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.mode = b""
        self.head = b""
        self.remaining = 0
        self.paused = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.mode == b"E":
            self.transport.write(data)
            return
        if not self.mode:
            self.mode, data = data[:1], data[1:]
        if self.mode == b"E":
            if data:
                self.transport.write(data)
        elif self.mode == b"S":
            self.head += data
            if len(self.head) >= 8 and not self.remaining:
                self.remaining = int.from_bytes(self.head[:8], "big")
                self.head = b""
                self._pump()

    def _pump(self) -> None:
        t = self.transport
        while self.remaining and not self.paused:
            n = min(self.remaining, 256)
            t.write(_BLOCK if n == 256 else RECORD * n)
            self.remaining -= n

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()


async def serve_bare(args: argparse.Namespace) -> None:
    from zrpc.tls import TlsConfig

    ctx = TlsConfig.development().server_context()
    assert ctx is not None
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(BareProtocol, "127.0.0.1", 0, ssl=ctx, backlog=4096)
    host, port = srv.sockets[0].getsockname()[:2]
    _ready(args.ready_file, {"address": f"{host}:{port}"})
    await _until_signal()
    srv.close()


# ------------------------------------------------------------------------ zmq
def serve_zmq(args: argparse.Namespace) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(args.endpoint)
    _ready(args.ready_file, {"endpoint": args.endpoint})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    recv, send = sock.recv_multipart, sock.send_multipart
    try:
        while True:  # ends with SIGTERM
            send(recv(copy=False), copy=False)
    finally:
        sock.close(0)
        ctx.term()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.servers")
    p.add_argument("kind", choices=["zrpc", "grpc", "bare", "zmq"])
    p.add_argument("--ready-file", required=True)
    p.add_argument("--endpoint", default="")
    p.add_argument("--max-connections", type=int, default=20_000)
    p.add_argument("--loop", choices=["default", "uvloop"], default="default", help="grpc only")
    args = p.parse_args(argv)
    raise_nofile()
    if args.kind == "zmq":
        serve_zmq(args)
    elif args.kind == "grpc" and args.loop == "default":
        asyncio.run(serve_grpc(args))  # grpc.aio on the default loop, as its docs use it
    elif args.kind == "grpc":
        import uvloop

        uvloop.run(serve_grpc(args))
    else:
        import uvloop

        uvloop.run(serve_zrpc(args) if args.kind == "zrpc" else serve_bare(args))


if __name__ == "__main__":
    main()
