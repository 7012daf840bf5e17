"""Runs across instances: with a Redis channel layer, events reach a socket served by any
instance and a cancel reaches the instance executing the run."""

import asyncio
import uuid
from unittest import mock

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from chat import services
from chat.agent.executor import InProcessExecutor, get_executor
from chat.agent.host import RunHost
from chat.events import event_log
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
    other_instance = InProcessExecutor(RunHost())
    assert await sync_to_async(other_instance.cancel)(uuid.UUID(run_id)) is True
    frames = await receive_until(socket, "run.cancelled")

    assert frames[-1]["run"] == run_id
    run = await Run.objects.aget(id=run_id)
    assert run.status == Run.Status.CANCELLED
    await socket.disconnect()


async def test_a_cancel_broadcast_for_one_run_leaves_the_processs_other_runs_going(
    make_user, settings, redis_channel_layer
):
    # One listener per process hears every broadcast cancel, and stops only its run.
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    sockets, runs = [], []
    for _ in range(2):
        conversation = await database_sync_to_async(services.conversation_create)(owner=user)
        socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
        await socket.receive_json_from()
        await socket.send_json_to({"type": "message", "content": "a long answer please"})
        runs.append((await receive_until(socket, "token"))[0]["run"])
        sockets.append(socket)

    other_instance = InProcessExecutor(RunHost())
    assert await sync_to_async(other_instance.cancel)(uuid.UUID(runs[0])) is True

    assert (await receive_until(sockets[0], "run.cancelled"))[-1]["run"] == runs[0]
    assert (await receive_until(sockets[1], "run.completed"))[-1]["run"] == runs[1]
    for socket in sockets:
        await socket.disconnect()


async def test_a_run_stopped_before_it_listens_for_cancels_ends_cancelled(
    make_user, redis_channel_layer
):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    with mock.patch.object(get_executor(), "submit"):  # started here, by hand
        run = await database_sync_to_async(services.run_create)(
            conversation=conversation, content="hello"
        )
    host = RunHost()
    host.start(run.id)
    await asyncio.sleep(0)  # it subscribes to the run's cancels, and waits for Redis
    assert await host.cancel_local(run.id)
    await host.join(run.id)

    # Not left queued, with nobody to start it.
    assert (await Run.objects.aget(id=run.id)).status == Run.Status.CANCELLED


async def test_a_stop_reaching_another_instance_before_the_run_starts_ends_it_cancelled(
    make_user, redis_channel_layer
):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    with mock.patch.object(get_executor(), "submit"):  # its instance has not started it yet
        run = await database_sync_to_async(services.run_create)(
            conversation=conversation, content="hello"
        )

    # The stop reaches an instance that does not execute it: nobody listens for it yet.
    other_instance = InProcessExecutor(RunHost())
    assert await sync_to_async(other_instance.cancel)(run.id) is True
    its_instance = RunHost()
    its_instance.start(run.id)
    await its_instance.join(run.id)

    assert (await Run.objects.aget(id=run.id)).status == Run.Status.CANCELLED
    assert [f.type for f in await event_log().after(run.id, 0)] == ["run.cancelled"]
