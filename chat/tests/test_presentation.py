"""Run events carry data; the chat socket renders and words them as it sends each frame."""

import uuid
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async

from agentsite.formatting import format_usd
from chat import services
from chat.events import event_log
from chat.presentation import browser_frame
from conftest import account_with_limits, open_socket, receive_until

pytestmark = pytest.mark.django_db(transaction=True)


async def test_the_log_keeps_data_and_the_socket_sends_what_the_page_draws(make_user):
    user = await database_sync_to_async(make_user)()
    await database_sync_to_async(account_with_limits)(user, tokens_per_day=1_000_000)
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()

    await socket.send_json_to({"type": "message", "content": "What is **17 * 23**?"})
    frames = await receive_until(socket, "run.completed")
    await socket.disconnect()
    logged = [f.event() for f in await event_log().after(uuid.UUID(frames[0]["run"]), 0)]

    started, completed = logged[0], logged[-1]
    # What the run emitted: text and numbers, no HTML, no display strings.
    assert started["user_message"].keys() == {"id", "content"}
    assert completed["messages"][0].keys() == {"id", "content"}
    assert "cost_display" not in completed
    assert completed["budget"]["left"]["tokens_today"][1] == 1_000_000
    # What the browser got: the same, rendered.
    assert frames[0]["user_message"]["html"] == "<p>What is <strong>17 * 23</strong>?</p>\n"
    assert "<strong>391</strong>" in frames[-1]["messages"][0]["html"]
    # Priced or not (the price table may have been emptied by an earlier test).
    cost = completed["cost_usd"]
    shown = "price unknown" if cost is None else format_usd(Decimal(cost))
    assert frames[-1]["cost_display"] == shown
    assert frames[-1]["budget"]["display"].startswith("Budget left today: ")
    assert "of 1,000,000 tokens" in frames[-1]["budget"]["display"]


def test_a_final_event_is_worded_as_every_page_words_it() -> None:
    final = {
        "type": "run.failed",
        "run": str(uuid.uuid4()),
        "seq": 9,
        "status": "failed",
        "messages": [{"id": 1, "content": "<img src=x onerror=alert(1)>"}],
        "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3},
        "cost_usd": "0.00012",
        "budget": {"left": None},
    }

    frame = browser_frame(final)

    assert frame["messages"][0]["html"] == "<p>&lt;img src=x onerror=alert(1)&gt;</p>\n"
    assert frame["cost_display"] == "$0.00012"
    assert frame["budget"] == {"display": None, "exhausted": False}  # no limits
    assert browser_frame({**final, "budget": None})["budget"] is None  # unknown
    assert "html" not in final["messages"][0]  # the event, shared by every socket, kept
