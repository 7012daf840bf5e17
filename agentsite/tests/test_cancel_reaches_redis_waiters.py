"""A task waiting on Redis stops when cancelled, whatever step its command is at.

On Python 3.11, `asyncio.wait_for` swallowed a cancel that arrived as the awaited send
finished (CPython gh-86296); redis-py sends every command through it. A chat socket's
channel-layer receive, or a run's cancel listener, then went on waiting, and whoever
awaited it (the socket's teardown, the run's end) hung for good."""

import asyncio
import contextlib

import pytest
from channels_redis.core import RedisChannelLayer
from django.conf import settings

from tests.servers import REDIS_URL, redis_available

pytestmark = pytest.mark.skipif(
    not redis_available(), reason="Redis is NOT reachable on 127.0.0.1:6379: untested"
)


async def test_a_channel_layer_receive_stops_at_any_step_it_is_cancelled() -> None:
    layer = RedisChannelLayer(
        hosts=[{"address": REDIS_URL, **settings.REDIS_CLIENT_OPTIONS}],
        prefix="agentsite-test-cancel",
    )
    try:
        channel = await layer.new_channel()
        await layer.group_add("warm-up", channel)  # the pool holds a live connection
        # Cancel after each number of loop steps in turn: one of them lands as the
        # blocking pop's command has just been sent.
        for steps in range(60):
            receiving = asyncio.create_task(layer.receive(channel))
            for _ in range(steps):
                await asyncio.sleep(0)
            receiving.cancel()
            done, _ = await asyncio.wait([receiving], timeout=15)
            assert done, f"a receive cancelled after {steps} loop steps went on waiting"
            with contextlib.suppress(asyncio.CancelledError):
                receiving.result()
    finally:
        await layer.group_discard("warm-up", channel)
        await layer.close_pools()
