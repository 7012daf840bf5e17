"""An operator's delete in the admin is the user's delete: the conversation's runs stop
and its agent memory (the checkpoints) goes with it."""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings as django_settings
from django.urls import reverse
from langgraph.checkpoint.sqlite import SqliteSaver

from chat import services
from chat.event_schemas import FINAL_EVENT_TYPES
from chat.models import Conversation
from conftest import open_socket, receive_until, wait_for_runs

pytestmark = pytest.mark.django_db(transaction=True)


def checkpoints_of(conversation_id: str) -> int:
    with SqliteSaver.from_conn_string(str(django_settings.AGENT_CHECKPOINT_SQLITE_PATH)) as saver:
        return len(list(saver.list({"configurable": {"thread_id": conversation_id}})))


def delete_in_admin(client, conversation: Conversation, how: str):
    if how == "single":
        url = reverse("admin:chat_conversation_delete", args=[conversation.id])
        return client.post(url, {"post": "yes"})
    return client.post(
        reverse("admin:chat_conversation_changelist"),
        {"action": "delete_selected", "_selected_action": [str(conversation.id)], "post": "yes"},
    )


@pytest.mark.parametrize("how", ["single", "bulk"])
async def test_an_admin_delete_stops_the_runs_and_forgets_the_memory(
    how, make_user, admin_client, settings
):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    # An earlier turn left agent memory behind.
    await socket.send_json_to({"type": "message", "content": "What is 2 * 3?"})
    await receive_until(socket, "run.completed")
    assert await sync_to_async(checkpoints_of)(str(conversation.id)) > 0

    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.2  # long enough to be mid-answer at the delete
    await socket.send_json_to({"type": "message", "content": "Tell me a long story."})
    await receive_until(socket, "token", wait=30)

    response = await sync_to_async(delete_in_admin)(admin_client, conversation, how)
    assert response.status_code == 302, response.content[:3000]
    frames = []
    while not frames or frames[-1]["type"] not in FINAL_EVENT_TYPES:
        frames.append(await socket.receive_json_from(timeout=30))
    await asyncio.wait_for(wait_for_runs(), timeout=30)
    await socket.disconnect()

    assert frames[-1]["type"] == "run.cancelled"
    assert not await Conversation.objects.filter(id=conversation.id).aexists()
    assert await sync_to_async(checkpoints_of)(str(conversation.id)) == 0
