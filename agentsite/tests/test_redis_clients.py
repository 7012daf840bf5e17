"""Every Redis client the app builds reads with a timeout longer than the channel layer's
blocking pop, and keeps a connect timeout, TCP keepalive and health checks; checked in a
fresh interpreter configured as a deployment is (AGENT_REDIS_URL set)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from channels_redis.core import RedisChannelLayer
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]

# Builds each client as the app does; none of them connects until it is first used.
CLIENTS = """
import asyncio, json
import django
django.setup()
from channels.layers import get_channel_layer
from channels_redis.utils import create_pool
from django.core.cache import cache
from billing.ratelimit import get_limiter
from chat.events import event_log

async def event_log_pool():
    return event_log()._client().connection_pool

pools = {
    "channel layer": create_pool(get_channel_layer().hosts[0]),
    "cache": cache.client.get_client().connection_pool,
    "event log": asyncio.run(event_log_pool()),
    "rate limiter": get_limiter().storage.storage.connection_pool,
}
keys = ("socket_timeout", "socket_connect_timeout", "socket_keepalive", "health_check_interval")
print(json.dumps({
    name: {key: pool.connection_kwargs.get(key) for key in keys} for name, pool in pools.items()
}))
"""


def run_with_redis(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "DJANGO_"))},
            "AGENTSITE_READ_DOTENV": "false",
            "DEBUG": "true",
            "DJANGO_SETTINGS_MODULE": "agentsite.settings",
            "AGENT_REDIS_URL": "redis://127.0.0.1:6379/15",
            **env,
        },
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_settings_know_the_channel_layers_blocking_pop() -> None:
    assert RedisChannelLayer.brpop_timeout == settings.CHANNEL_LAYER_BLOCKING_POP


def test_every_redis_client_outwaits_the_blocking_pop_and_still_notices_a_dead_redis() -> None:
    result = run_with_redis(CLIENTS)
    assert result.returncode == 0, result.stderr
    clients = json.loads(result.stdout)
    assert set(clients) == {"channel layer", "cache", "event log", "rate limiter"}
    for name, options in clients.items():
        assert options["socket_timeout"] >= 2 * RedisChannelLayer.brpop_timeout, name
        assert 0 < options["socket_connect_timeout"] <= 10, name
        assert options["socket_keepalive"] is True, name
        assert options["health_check_interval"] > 0, name


def test_a_read_timeout_the_blocking_pop_would_hit_refuses_to_start() -> None:
    result = run_with_redis("import agentsite.settings", AGENT_REDIS_READ_TIMEOUT="5")
    assert result.returncode != 0
    assert "AGENT_REDIS_READ_TIMEOUT must be at least 10 seconds" in result.stderr


BURST = """
import asyncio
import django
django.setup()
from channels.layers import get_channel_layer
from chat.events import event_log

async def burst():
    # 300 runs publishing at once: each command in flight holds a connection.
    layer = get_channel_layer()
    await asyncio.gather(
        *(layer.group_send(f"burst-{i}", {"type": "run.events"}) for i in range(300))
    )
    client = event_log()._client()
    await asyncio.gather(*(client.ping() for _ in range(300)))

asyncio.run(burst())
print("ok")
"""


def test_three_hundred_commands_at_once_find_a_connection() -> None:
    # redis-py 8's asyncio pools stop at 100 connections ("Too many connections").
    result = run_with_redis(BURST)

    assert result.stdout.strip() == "ok", result.stderr[-2000:]
