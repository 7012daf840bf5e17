import pytest
from channels.db import database_sync_to_async

from chat import services
from chat.models import Message, Run
from conftest import open_socket, receive_until, wait_for_runs

pytestmark = pytest.mark.django_db(transaction=True)


async def start(user, make_conversation=True):
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    session = await socket.receive_json_from()
    assert session == {"type": "session", "conversation": str(conversation.id), "active_run": None}
    return conversation, socket


async def test_message_streams_tool_steps_and_answer_in_seq_order(make_user):
    user = await database_sync_to_async(make_user)()
    conversation, socket = await start(user)

    await socket.send_json_to({"type": "message", "content": "What is 17 * 23?"})
    frames = await receive_until(socket, "run.completed")

    types = [f["type"] for f in frames]
    assert types[0] == "run.started"
    assert types.index("tool.started") < types.index("tool.finished") < types.index("token")
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    started = frames[types.index("tool.started")]
    assert started["name"] == "calculator" and started["args"] == {"expression": "17 * 23"}
    assert frames[types.index("tool.finished")]["result"] == "391"
    answer = "".join(f["text"] for f in frames if f["type"] == "token")
    assert "391" in answer
    completed = frames[-1]
    assert completed["usage"]["total_tokens"] > 0
    assert "<strong>391</strong>" in completed["messages"][0]["html"]
    await socket.disconnect()

    run = await Run.objects.aget(conversation=conversation)
    assert run.status == Run.Status.COMPLETED and run.total_tokens == completed["usage"]["total_tokens"]
    roles = [m.role async for m in Message.objects.filter(conversation=conversation)]
    assert roles == ["user", "tool", "assistant"]
