"""Runs across instances: with a Redis channel layer, events reach a socket served by any
instance and a cancel reaches the instance executing the run."""

import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from chat import services
from chat.agent.executor import InProcessExecutor
from chat.models import Run
from conftest import open_socket, receive_until
from tests.servers import REDIS_URL, redis_available

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not redis_available(),
        reason="Redis is NOT reachable on 127.0.0.1:6379: multi-instance runs untested",
    ),
]


@pytest.fixture
def redis_channel_layer(settings):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": "agentsite-test"},
        }
    }
    yield get_channel_layer()


async def test_a_cancel_from_another_instance_stops_the_run(
    make_user, settings, redis_channel_layer
):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()

    await socket.send_json_to({"type": "message", "content": "a long answer please"})
    started = await receive_until(socket, "token")
    run_id = started[0]["run"]

    # Another instance has no task for this run: it can only broadcast the cancel.
    other_instance = InProcessExecutor()
    assert await sync_to_async(other_instance.cancel)(uuid.UUID(run_id)) is True
    frames = await receive_until(socket, "run.cancelled")

    assert frames[-1]["run"] == run_id
    run = await Run.objects.aget(id=run_id)
    assert run.status == Run.Status.CANCELLED
    await socket.disconnect()
