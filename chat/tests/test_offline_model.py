"""The built-in offline model answers questions about the time in a place with the
place's time, or says it does not know the place: never UTC in its stead."""

import pytest
from channels.db import database_sync_to_async
from langchain_core.messages import HumanMessage

from chat import services
from chat.agent.offline_model import _plan_tool_calls
from conftest import open_socket, receive_until


@pytest.mark.parametrize(
    ("question", "place"),
    [
        ("What time is it in Tokyo?", "Tokyo"),
        ("what time is it in new york right now?", "new york"),
        ("What's the date in Europe/Paris?", "Europe/Paris"),
        ("What time is it in Springfield?", "Springfield"),  # unknown: the tool says so
        ("What time is it?", None),
    ],
)
def test_the_time_question_names_its_place(question: str, place: str | None) -> None:
    calls = _plan_tool_calls([HumanMessage(question)], {"current_time"})
    assert calls == [("current_time", {"timezone": place} if place else {})]


async def ask(user, question: str) -> dict:
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    await socket.send_json_to({"type": "message", "content": question})
    frames = await receive_until(socket, "run.completed")
    await socket.disconnect()
    return frames[-1]


@pytest.mark.django_db(transaction=True)
async def test_what_time_is_it_in_tokyo(make_user):
    user = await database_sync_to_async(make_user)()

    tokyo = await ask(user, "What time is it in Tokyo?")
    assert "(Asia/Tokyo, UTC+0900)" in tokyo["messages"][0]["content"]

    nowhere = await ask(user, "What time is it in Springfield?")
    answer = nowhere["messages"][0]["content"]
    assert "could not find the time zone of 'Springfield'" in answer
    assert "UTC+0000" not in answer
