"""Unary: send one message and print the acknowledgement with its id."""

import asyncio
import os
import sys

import zrpc
from zrpc.chat import ChatResponse, Message


async def main(text: str) -> None:
    async with zrpc.Client() as client:
        await client.connect(os.environ.get("ZRPC_SERVER", "localhost:8443"),
                             zrpc.TlsConfig.client())
        try:
            ack = await client.unary("Chat/SendMessage",
                                     Message(user="alice", content=text, room="general"),
                                     ChatResponse, timeout=5)
        except zrpc.RpcError as err:          # typed errors carry a status
            print(f"failed: {err.status.name}: {err.message}")
            raise SystemExit(1) from None
        assert ack.message is not None
        print(f"stored as #{ack.message.id} at {ack.message.timestamp}")


asyncio.run(main(" ".join(sys.argv[1:]) or "Hello from zrpc"))
