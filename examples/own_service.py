"""Your own service, in-process, tested with zrpc.testing: all four call patterns."""

import asyncio
from dataclasses import dataclass

import zrpc
from zrpc.testing import MockServer, connect_in_memory


@dataclass
class Number:
    value: int


svc = zrpc.Service("Math")


@svc.unary("Square", request=Number, response=Number)
async def square(n: Number, context: zrpc.RequestContext) -> Number:
    return Number(n.value * n.value)


@svc.client_stream("Sum", request=Number, response=Number)
async def total(call: zrpc.ServerCall) -> Number:
    return Number(sum([n.value async for n in call]))


@svc.server_stream("Range", request=Number, response=Number)
async def count_up(n: Number, call: zrpc.ServerCall) -> None:
    for i in range(n.value):
        await call.send(Number(i))          # waits for flow-control credit


@svc.bidi("Double", request=Number, response=Number)
async def double(call: zrpc.ServerCall) -> None:
    async for n in call:
        await call.send(Number(2 * n.value))


async def main() -> None:
    server = zrpc.Server(zrpc.ServerConfig())
    server.add_service(svc)
    client = await connect_in_memory(server)   # real client + real server, no sockets

    assert await client.unary("Math/Square", Number(7), Number) == Number(49)

    up = await client.client_stream("Math/Sum", Number, Number)
    for i in range(1, 5):
        await up.send(Number(i))
    assert await up.close_and_receive() == Number(10)

    down = await client.server_stream("Math/Range", Number(3), Number)
    assert [n.value async for n in down] == [0, 1, 2]

    both = await client.bidirectional_stream("Math/Double", Number, Number)
    await both.send(Number(21))
    assert await both.receive() == Number(42)
    await both.close_send()
    assert await both.receive() is None

    # a mock with expectations, for testing client code alone
    mock = MockServer()
    mock.expect_unary("Math/Square", Number(3), Number(9))
    mocked = await mock.client()
    assert await mocked.unary("Math/Square", Number(3), Number) == Number(9)
    mock.verify()
    print("all four patterns work")


asyncio.run(main())
