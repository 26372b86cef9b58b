"""Minimal reproduction: a TLS server's RSS under connection churn, with and without malloc_trim.

No zrpc code: an echo server on uvloop (or the stdlib loop) and, in the same
process, 8 rounds of 200 TLS connections that each send 64 KiB, read it back
and close. docs/performance.md ("Memory under connection churn") has the
numbers and what they mean::

    python -m bench.churn_repro uvloop          # RSS creeps up round after round
    python -m bench.churn_repro uvloop trim     # malloc_trim(0) after each round: flat
    python -m bench.churn_repro asyncio [trim]  # the stdlib loop, same pattern
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import ssl
import subprocess
import sys
import tempfile
from typing import Any


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def churn(trim: bool, rounds: int = 8, per_round: int = 200) -> None:
    d = tempfile.mkdtemp()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", f"{d}/k.pem", "-out", f"{d}/c.pem", "-days", "1",
                    "-subj", "/CN=localhost"], check=True, capture_output=True)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(f"{d}/c.pem", f"{d}/k.pem")
    cctx = ssl.create_default_context(cafile=f"{d}/c.pem")
    srv = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0, ssl=sctx)
    port = srv.sockets[0].getsockname()[1]
    junk = os.urandom(64 * 1024)
    sem = asyncio.Semaphore(20)

    async def one() -> None:
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=cctx, server_hostname="localhost")
            w.write(junk)
            await w.drain()
            await r.readexactly(len(junk))
            w.close()
            await w.wait_closed()

    for k in range(rounds):
        await asyncio.gather(*(one() for _ in range(per_round)))
        await asyncio.sleep(0.5)  # let the closes finish before sampling
        if trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        print(f"round {k}: {per_round * (k + 1)} connections, RSS {rss_mib():.1f} MiB", flush=True)
    srv.close()


def main() -> None:
    loop = sys.argv[1] if len(sys.argv) > 1 else "uvloop"
    trim = "trim" in sys.argv[2:]
    if loop == "uvloop":
        import uvloop

        uvloop.run(churn(trim))
    else:
        asyncio.run(churn(trim))


if __name__ == "__main__":
    main()
