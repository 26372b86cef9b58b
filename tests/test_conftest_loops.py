"""The suite's guard against hung event loops (tests/conftest.py) fails the one test."""

from __future__ import annotations

import asyncio

import pytest
import uvloop


@pytest.mark.timeout(7)
def test_a_hung_await_fails_the_test_with_its_line_before_the_timeout() -> None:
    async def main() -> None:
        await asyncio.Event().wait()  # never set

    with pytest.raises(AssertionError, match="still waiting after") as err:
        uvloop.run(main())
    cause = err.value.__cause__
    assert isinstance(cause, TimeoutError)


def test_a_loop_that_finishes_returns_its_value() -> None:
    async def main() -> int:
        await asyncio.sleep(0)
        return 7

    assert uvloop.run(main()) == 7
