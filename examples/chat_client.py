"""Bidirectional streaming: chat from stdin, print the room's events (the streaming tutorial's chat client)."""

import asyncio
import os
import sys

import zrpc
from zrpc.chat import ResponseType
from zrpc.chat_client import ChatClient


async def main(user: str, room: str) -> None:
    chat = await ChatClient.connect(os.environ.get("ZRPC_SERVER", "localhost:8443"),
                                    zrpc.TlsConfig.client())
    async with chat.join(room, user) as session:

        async def show_events() -> None:
            async for event in session:
                if event.type is ResponseType.message and event.message is not None:
                    print(f"{event.message.user}: {event.message.content}", flush=True)
                elif event.type is ResponseType.user_joined:
                    print(f"{event.user_joined} joined the chat", flush=True)
                elif event.type is ResponseType.user_left:
                    print(f"{event.user_left} left the chat", flush=True)

        printer = asyncio.create_task(show_events())
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            text = line.strip()
            if not line or text == "quit":
                break
            if text:
                stored = await session.send(text)   # resolves with the stored message (its id)
                print(f"(sent #{stored.id})", flush=True)
        await session.close()
        await printer
    await chat.close()
    print("Chat session ended!")


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "guest",
                 sys.argv[2] if len(sys.argv) > 2 else "general"))
