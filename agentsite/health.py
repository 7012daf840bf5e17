"""Liveness and readiness probes for load balancers and orchestrators."""

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, cast

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

PROBE_TIMEOUT = 2.0


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Alive: the process answers. Checks nothing else, so a slow database never gets
    a healthy process restarted."""
    return JsonResponse({"status": "ok"})


@require_GET
async def readyz(request: HttpRequest) -> JsonResponse:
    """Ready: the database, Redis (when configured) and the channel layer answer."""
    checks = {
        "database": await _check(sync_to_async(_ping_database)()),
        "channel_layer": await _check(_ping_channel_layer()),
    }
    if settings.REDIS_URL:
        checks["redis"] = await _check(_ping_redis())
    ready = all(result == "ok" for result in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
    )


async def _check(probe: Coroutine[Any, Any, None]) -> str:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await probe
    except Exception as error:  # any failure means "not ready", never a 500
        return f"error: {type(error).__name__}"
    return "ok"


def _ping_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _ping_channel_layer() -> None:
    layer = get_channel_layer()
    assert layer is not None
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "readyz.ping"})
    await layer.receive(channel)


async def _ping_redis() -> None:
    # Imported here: redis-py takes about 7 MiB of memory, which a server without Redis
    # (the embedded defaults) never needs.
    from redis.asyncio import Redis

    client = Redis.from_url(settings.REDIS_URL, socket_connect_timeout=PROBE_TIMEOUT)
    try:
        # redis-py types ping() for its sync and async clients at once.
        await cast(Awaitable[bool], client.ping())
    finally:
        await client.aclose()
