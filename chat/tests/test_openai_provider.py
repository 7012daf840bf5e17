"""The OpenAI provider path end to end: a user's message over the WebSocket, our graph,
langchain-openai and the openai SDK for real, against a real local HTTP server speaking
the Chat Completions wire format. The server is the only fake."""

import asyncio
import json
import socket as sockets
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from chat import services
from chat.agent.prompts import SYSTEM_PROMPT
from chat.models import Conversation, Message, Run
from conftest import open_socket, receive_until, wait_for_runs
from tests.fakes._base import FakeLLMServer, split_tokens
from tests.fakes.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.django_db(transaction=True)

MAX_RETRIES = 2
SYSTEM_PROMPT_START = SYSTEM_PROMPT.split("{now}")[0]


@pytest.fixture
def llm():
    with FakeOpenAIServer() as server:
        yield server
        server.assert_script_used()


@pytest.fixture(autouse=True)
def openai_settings(settings, llm):
    settings.AGENT_MODEL = "openai"
    settings.AGENT_OPENAI_BASE_URL = llm.base_url
    settings.AGENT_OPENAI_API_KEY = "sk-test"
    settings.AGENT_OPENAI_MODEL = "gpt-fake-mini"
    settings.AGENT_PROVIDER_MAX_RETRIES = MAX_RETRIES
    settings.AGENT_PROVIDER_TIMEOUT = 5.0
    return settings


@pytest.fixture(autouse=True)
def no_tiktoken(monkeypatch):
    """A tripwire: tiktoken downloads its encodings on first use, so nothing on the
    provider path may call it (we count tokens approximately)."""
    calls = []

    def forbidden(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise AssertionError("tiktoken was called: it would download its encoding files")

    for target in (
        "tiktoken.get_encoding",
        "tiktoken.encoding_for_model",
        "tiktoken.registry.get_encoding",
        "tiktoken.model.get_encoding",
    ):
        monkeypatch.setattr(target, forbidden)
    yield
    assert calls == []


@pytest.fixture
async def chat(make_user, llm):
    """A conversation and an open WebSocket to it."""
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    assert (await socket.receive_json_from())["type"] == "session"
    yield conversation, socket
    # A test that failed half-way may leave a run waiting on a stalled reply: stopping
    # the server hangs up on it, so the run ends instead of blocking the next test.
    llm.stop()
    await asyncio.wait_for(wait_for_runs(), timeout=15)
    await socket.disconnect()


FINAL_EVENTS = {"run.completed", "run.failed", "run.cancelled", "run.limit_reached"}


async def ask(socket: WebsocketCommunicator, content: str, until: str) -> list[dict[str, Any]]:
    """Send a message and collect the run's frames up to its final event, which must be
    `until` (any final event stops the wait, so a wrong outcome fails at once)."""
    await socket.send_json_to({"type": "message", "content": content})
    frames = []
    while not frames or frames[-1]["type"] not in FINAL_EVENTS:
        frames.append(await socket.receive_json_from(timeout=10))
    await wait_for_runs()
    assert frames[-1]["type"] == until, frames[-1]
    return frames


def of_type(frames: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == event_type]


def streamed_text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in of_type(frames, "token"))


async def assert_failed(frames: list[dict[str, Any]], code: str, conversation: Conversation) -> Run:
    """The run ended failed with `code`, on the socket and in the database alike."""
    final = frames[-1]
    assert final["type"] == "run.failed"
    assert final["status"] == "failed"
    assert final["error"]["code"] == code
    assert final["error"]["message"]
    run = await Run.objects.aget(id=final["run"], conversation=conversation)
    assert run.status == Run.Status.FAILED
    assert run.error_code == code
    assert run.error_message == final["error"]["message"]
    assert run.finished_at is not None
    return run


async def assert_socket_still_usable(llm: FakeLLMServer, socket: WebsocketCommunicator) -> None:
    """After a failure the same socket and conversation answer the next message."""
    llm.text("Back on my feet.")  # type: ignore[attr-defined]
    await socket.send_json_to({"type": "message", "content": "Are you there?"})
    frames = await receive_until(socket, "run.completed")
    assert streamed_text(frames) == "Back on my feet."
    assert frames[-1]["messages"][0]["content"] == "Back on my feet."


# -- answers ------------------------------------------------------------------------------


async def test_tokens_stream_in_order_and_the_answer_is_stored(llm, chat):
    conversation, socket = chat
    answer = "Hello from the **fake** provider, token by token!"
    llm.text(answer, prompt_tokens=42, completion_tokens=11)

    frames = await ask(socket, "Say hello", "run.completed")

    types = [f["type"] for f in frames]
    assert types[0] == "run.started"
    assert frames[0]["model"] == f"gpt-fake-mini via {llm.base_url}"
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    # One frame per chunk the provider sent, in the order it sent them.
    assert [f["text"] for f in of_type(frames, "token")] == split_tokens(answer)
    assert types.index("token") < types.index("usage") < types.index("run.completed")
    completed = frames[-1]
    assert completed["status"] == "completed"
    assert completed["messages"][0]["content"] == answer
    assert "<strong>fake</strong>" in completed["messages"][0]["html"]

    run = await Run.objects.aget(conversation=conversation)
    assert run.status == Run.Status.COMPLETED
    assert run.model == "gpt-fake-mini"
    assert run.steps == 1
    stored = [(m.role, m.content) async for m in Message.objects.filter(conversation=conversation)]
    assert stored == [("user", "Say hello"), ("assistant", answer)]


async def test_provider_usage_reaches_run_completed_and_the_run_row(llm, chat):
    conversation, socket = chat
    llm.text("Counted.", prompt_tokens=1234, completion_tokens=56, cached_tokens=1000)

    frames = await ask(socket, "Count my tokens", "run.completed")

    usage = {"input_tokens": 1234, "output_tokens": 56, "total_tokens": 1290}
    assert [{k: f[k] for k in usage} for f in of_type(frames, "usage")] == [usage]
    assert frames[-1]["usage"] == usage
    run = await Run.objects.aget(conversation=conversation)
    assert (run.input_tokens, run.output_tokens, run.total_tokens) == (1234, 56, 1290)


async def test_request_carries_model_settings_system_prompt_tools_and_user_message(
    llm, chat, settings
):
    _, socket = chat
    llm.text("Noted.")

    await ask(socket, "Remember: the sky is green.", "run.completed")

    request = llm.last_request
    assert request.method == "POST" and request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = request.body
    assert body["model"] == "gpt-fake-mini"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == settings.AGENT_TEMPERATURE
    assert settings.AGENT_MAX_TOKENS in (body.get("max_tokens"), body.get("max_completion_tokens"))
    system, user = request.messages
    assert system["role"] == "system" and system["content"].startswith(SYSTEM_PROMPT_START)
    assert user == {"role": "user", "content": "Remember: the sky is green."}
    assert request.tool_names == ["calculator", "current_time"]
    calculator = request.body["tools"][0]["function"]
    assert "arithmetic" in calculator["description"]
    assert calculator["parameters"]["properties"]["expression"]["type"] == "string"
    assert calculator["parameters"]["required"] == ["expression"]


async def test_the_next_turn_sends_the_conversation_so_far(llm, chat):
    _, socket = chat
    llm.text("Noted: the sky is green.")
    llm.text("You said it is green.")

    await ask(socket, "Remember: the sky is green.", "run.completed")
    await ask(socket, "What colour is the sky?", "run.completed")

    first, second = llm.requests
    assert second.messages[0]["role"] == "system"
    assert [(m["role"], m["content"]) for m in second.messages[1:]] == [
        ("user", "Remember: the sky is green."),
        ("assistant", "Noted: the sky is green."),
        ("user", "What colour is the sky?"),
    ]
    assert len(first.messages) == 2


async def test_a_tool_call_runs_our_calculator_and_the_result_goes_back_to_the_model(llm, chat):
    conversation, socket = chat
    llm.tool_call(
        "calculator",
        {"expression": "17 * 23"},
        id="call_calc1",
        prompt_tokens=100,
        completion_tokens=20,
    )
    llm.text("17 * 23 = **391**.", prompt_tokens=130, completion_tokens=9)

    frames = await ask(socket, "What is 17 * 23?", "run.completed")

    types = [f["type"] for f in frames]
    assert types.index("tool.started") < types.index("tool.finished") < types.index("token")
    started, finished = of_type(frames, "tool.started")[0], of_type(frames, "tool.finished")[0]
    assert started["tool_call_id"] == "call_calc1"
    assert started["name"] == "calculator" and started["args"] == {"expression": "17 * 23"}
    assert finished["tool_call_id"] == "call_calc1"
    assert finished["result"] == "391" and finished["is_error"] is False
    assert streamed_text(frames) == "17 * 23 = **391**."

    # The second request carries the model's call and our tool's result.
    assert len(llm.requests) == 2
    *_, call_message, result_message = llm.requests[1].messages
    assert call_message["role"] == "assistant"
    [call] = call_message["tool_calls"]
    assert call["id"] == "call_calc1" and call["type"] == "function"
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {"expression": "17 * 23"}
    assert result_message == {"role": "tool", "tool_call_id": "call_calc1", "content": "391"}

    # Usage of both model calls is added up.
    total = {"input_tokens": 230, "output_tokens": 29, "total_tokens": 259}
    assert len(of_type(frames, "usage")) == 2
    assert frames[-1]["usage"] == total
    run = await Run.objects.aget(conversation=conversation)
    assert (run.status, run.steps, run.input_tokens, run.output_tokens) == (
        Run.Status.COMPLETED,
        2,
        230,
        29,
    )
    stored = [m async for m in Message.objects.filter(conversation=conversation)]
    assert [m.role for m in stored] == ["user", "tool", "assistant"]
    assert stored[1].tool == {
        "tool_call_id": "call_calc1",
        "name": "calculator",
        "args": {"expression": "17 * 23"},
        "result": "391",
        "is_error": False,
    }


async def test_bad_tool_input_from_the_model_is_reported_back_to_it(llm, chat):
    _, socket = chat
    llm.tool_call("calculator", {"expression": "import os"}, id="call_bad")
    llm.text("Sorry, I cannot compute that.")

    frames = await ask(socket, "Compute something odd", "run.completed")

    finished = of_type(frames, "tool.finished")[0]
    assert finished["is_error"] is True and finished["result"].startswith("Error: ")
    result_message = llm.requests[1].messages[-1]
    assert result_message["role"] == "tool" and result_message["tool_call_id"] == "call_bad"
    assert result_message["content"] == finished["result"]


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, "provider_auth"),
        (403, "provider_auth"),
        (404, "provider_model_not_found"),
        (400, "provider_bad_request"),
    ],
)
async def test_a_refusal_is_not_retried_and_fails_the_run(llm, chat, status, code):
    conversation, socket = chat
    llm.error(status, "Nope, says the provider.")

    frames = await ask(socket, "Hello?", "run.failed")

    run = await assert_failed(frames, code, conversation)
    assert "Nope, says the provider." in run.error_message
    assert len(llm.requests) == 1
    await assert_socket_still_usable(llm, socket)


async def test_rate_limiting_is_retried_then_fails_as_rate_limited(llm, chat):
    conversation, socket = chat
    llm.error(429, times=MAX_RETRIES + 1)

    frames = await ask(socket, "Hello?", "run.failed")

    await assert_failed(frames, "provider_rate_limited", conversation)
    assert [r.retry_count for r in llm.requests] == list(range(MAX_RETRIES + 1))
    await assert_socket_still_usable(llm, socket)


async def test_a_server_error_is_retried_and_the_run_completes(llm, chat):
    conversation, socket = chat
    llm.error(500)
    llm.error(503)
    llm.text("Third time lucky.", prompt_tokens=10, completion_tokens=4)

    frames = await ask(socket, "Hello?", "run.completed")

    assert streamed_text(frames) == "Third time lucky."
    assert [r.retry_count for r in llm.requests] == [0, 1, 2]
    # The retried requests are the same request.
    assert llm.requests[0].body == llm.requests[2].body
    run = await Run.objects.aget(conversation=conversation)
    assert run.status == Run.Status.COMPLETED and run.total_tokens == 14


async def test_persistent_server_errors_fail_as_unavailable(llm, chat):
    conversation, socket = chat
    llm.error(500, "The server is on fire.", times=MAX_RETRIES + 1)

    frames = await ask(socket, "Hello?", "run.failed")

    run = await assert_failed(frames, "provider_unavailable", conversation)
    assert "The server is on fire." in run.error_message
    assert len(llm.requests) == MAX_RETRIES + 1
    await assert_socket_still_usable(llm, socket)


async def test_an_error_in_the_middle_of_the_stream_fails_as_unavailable(llm, chat):
    conversation, socket = chat
    llm.stream_error("Something broke mid-answer.", text_before="Let me think")

    frames = await ask(socket, "Hello?", "run.failed")

    run = await assert_failed(frames, "provider_unavailable", conversation)
    assert "Something broke mid-answer." in run.error_message
    # What the user already saw is kept with the failed run.
    assert streamed_text(frames) == "Let me think"
    partial = await Message.objects.aget(run=run, role=Message.Role.ASSISTANT)
    assert partial.content == "Let me think"
    await assert_socket_still_usable(llm, socket)


async def test_a_malformed_reply_fails_as_bad_response(llm, chat):
    conversation, socket = chat
    llm.malformed()

    frames = await ask(socket, "Hello?", "run.failed")

    await assert_failed(frames, "provider_bad_response", conversation)
    assert len(llm.requests) == 1
    await assert_socket_still_usable(llm, socket)


async def test_a_provider_slower_than_the_timeout_fails_as_timeout(llm, chat, settings):
    conversation, socket = chat
    settings.AGENT_PROVIDER_TIMEOUT = 0.3
    settings.AGENT_PROVIDER_MAX_RETRIES = 1
    llm.slow(times=2)

    frames = await ask(socket, "Hello?", "run.failed")

    await assert_failed(frames, "provider_timeout", conversation)
    assert [r.retry_count for r in llm.requests] == [0, 1]
    settings.AGENT_PROVIDER_TIMEOUT = 5.0
    await assert_socket_still_usable(llm, socket)


async def test_a_stream_that_stalls_fails_as_timeout_and_keeps_the_partial_answer(
    llm, chat, settings
):
    conversation, socket = chat
    settings.AGENT_PROVIDER_TIMEOUT = 0.3
    llm.text("One two three four", stall_after=2)

    frames = await ask(socket, "Count to four", "run.failed")

    run = await assert_failed(frames, "provider_timeout", conversation)
    assert streamed_text(frames) == "One two"
    partial = await Message.objects.aget(run=run, role=Message.Role.ASSISTANT)
    assert partial.content == "One two"
    # A stream that already started is not retried by the SDK.
    assert len(llm.requests) == 1
    settings.AGENT_PROVIDER_TIMEOUT = 5.0
    await assert_socket_still_usable(llm, socket)


async def test_a_stream_kept_alive_without_content_fails_as_timeout(llm, chat, settings):
    conversation, socket = chat
    settings.AGENT_PROVIDER_TIMEOUT = 0.3
    llm.text("One two three four", keepalive_after=2)

    frames = await ask(socket, "Count to four", "run.failed")

    await assert_failed(frames, "provider_timeout", conversation)
    assert streamed_text(frames) == "One two"
    settings.AGENT_PROVIDER_TIMEOUT = 5.0
    await assert_socket_still_usable(llm, socket)


async def test_a_connection_cut_mid_stream_fails_as_unreachable(llm, chat):
    conversation, socket = chat
    llm.text("One two three four", drop_after=3)

    frames = await ask(socket, "Count to four", "run.failed")

    await assert_failed(frames, "provider_unreachable", conversation)
    assert streamed_text(frames) == "One two three"
    assert len(llm.requests) == 1
    await assert_socket_still_usable(llm, socket)


async def test_an_unreachable_server_fails_as_unreachable(llm, chat, settings):
    conversation, socket = chat
    settings.AGENT_PROVIDER_MAX_RETRIES = 1
    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings.AGENT_OPENAI_BASE_URL = f"http://127.0.0.1:{closed_port}/v1"

    frames = await ask(socket, "Hello?", "run.failed")

    run = await assert_failed(frames, "provider_unreachable", conversation)
    assert "connect" in run.error_message.lower()
    assert llm.requests == []
    settings.AGENT_OPENAI_BASE_URL = llm.base_url
    await assert_socket_still_usable(llm, socket)
