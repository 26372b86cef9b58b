"""Server streaming: follow a room, resuming after lost connections (the streaming tutorial's subscriber)."""

import asyncio
import os
import sys

import zrpc
from zrpc.chat import ResponseType
from zrpc.chat_client import ChatClient

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 50


async def main() -> None:
    chat = await ChatClient.connect(os.environ.get("ZRPC_SERVER", "localhost:8443"),
                                    zrpc.TlsConfig.client())
    seen = 0
    # since_id=0 replays the room's history first; omit it for live events only
    async with chat.subscribe("general", "subscriber", since_id=0) as events:
        async for event in events:
            if event.type is ResponseType.message and event.message is not None:
                m = event.message
                print(f"[{m.room}] #{m.id} {m.user}: {m.content}")
            elif event.type is ResponseType.user_joined:
                print(f"{event.user_joined} joined the room")
            elif event.type is ResponseType.user_left:
                print(f"{event.user_left} left the room")
            seen += 1
            if seen >= LIMIT:
                break
    await chat.close()
    print(f"Received {seen} events")


asyncio.run(main())
