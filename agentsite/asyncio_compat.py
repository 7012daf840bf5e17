"""`asyncio.wait_for` as Python 3.12 has it, for the Python 3.11 the project runs on.

3.11's `wait_for` returns the awaited result, swallowing the cancel, when a cancel
arrives as the awaited thing finishes (CPython gh-86296, fixed in 3.12). redis-py sends
every command through `wait_for` when a socket timeout is set (ours is), so a cancelled
channel-layer receive could go on waiting: the run's cancel listener never stopped, and a
socket whose `connect()` failed after a Redis restart was never closed, its client left
without a `session` frame. Drop this module once the project requires Python 3.12."""

import asyncio
import sys
from typing import Any


# The signature is `asyncio.wait_for`'s, which it stands in for.
async def _wait_for(fut: Any, timeout: float | None) -> Any:  # noqa: ASYNC109
    # 3.12's implementation: `asyncio.timeout` tells the timeout's cancel from any other.
    if timeout is not None and timeout <= 0:
        fut = asyncio.ensure_future(fut)
        if fut.done():
            return fut.result()
        fut.cancel()
        try:
            await fut
        except asyncio.CancelledError as exc:
            raise TimeoutError from exc
        return fut.result()
    async with asyncio.timeout(timeout):
        return await fut


def wait_for_fix_install() -> None:
    """Replace `asyncio.wait_for` before Python 3.12; a no-op from 3.12 on."""
    if sys.version_info < (3, 12):
        asyncio.wait_for = _wait_for  # type: ignore[assignment]
        asyncio.tasks.wait_for = _wait_for  # type: ignore[assignment]
