"""Client streaming: send a batch of messages, get one summary back (the streaming tutorial's batch client)."""

import asyncio
import os

import zrpc
from zrpc.chat import BatchSummary, Message


async def main() -> None:
    client = zrpc.Client(zrpc.ClientConfig(request_timeout_ms=60_000))
    await client.connect(os.environ.get("ZRPC_SERVER", "localhost:8443"), zrpc.TlsConfig.client())
    print("Connected to chat server")

    stream = await client.client_stream("Chat/SendMessageBatch", Message, BatchSummary)
    for user, text in [("alice", "Hello everyone!"), ("bob", "Hi Alice!"),
                       ("charlie", "Good morning!"), ("alice", "How is everyone?"),
                       ("bob", "Great, thanks!")]:
        await stream.send(Message(user=user, content=text, room="general"))
    summary = await stream.close_and_receive()

    print(f"Batch summary: {summary.total_messages} messages, "
          f"{summary.total_characters} characters")
    for user in summary.users:
        print(f"  - {user}")
    await client.close()


asyncio.run(main())
