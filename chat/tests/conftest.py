"""Fixtures for the chat tests; what the provider tests share besides is in
`provider_helpers`."""

import asyncio

import pytest
from channels.db import database_sync_to_async

from chat import services
from chat.tests.provider_helpers import Chat
from conftest import account_with_limits, open_socket, wait_for_runs


@pytest.fixture
async def chat(make_user, llm, settings):
    """A conversation and an open WebSocket to it, for a test module whose `llm` fixture
    runs a fake provider server (see `tests/fakes`) and points the settings at it."""
    user = await database_sync_to_async(make_user)()
    # The fake provider's model has no price: no money limit may stand in its way.
    await database_sync_to_async(account_with_limits)(user)
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    assert (await socket.receive_json_from())["type"] == "session"
    yield Chat(conversation, socket, llm, settings)
    # A test that failed half-way may leave a run waiting on a stalled reply: stopping
    # the server hangs up on it, so the run ends instead of blocking the next test.
    llm.stop()
    await asyncio.wait_for(wait_for_runs(), timeout=15)
    await socket.disconnect()
