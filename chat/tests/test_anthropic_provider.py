"""The Anthropic provider path end to end: a user's message over the WebSocket, our graph,
langchain-anthropic and the anthropic SDK for real, against a real local HTTP server
speaking the Messages API wire format. The server is the only fake."""

import asyncio
import json

import pytest
from channels.db import database_sync_to_async

from chat import services
from chat.agent.prompts import SYSTEM_PROMPT
from chat.models import Message, Run
from chat.tests.test_openai_provider import (
    ask,
    assert_failed,
    assert_socket_still_usable,
    of_type,
    streamed_text,
)
from conftest import open_socket, wait_for_runs
from tests.fakes._base import split_tokens
from tests.fakes.anthropic_server import FakeAnthropicServer

pytestmark = pytest.mark.django_db(transaction=True)

MAX_RETRIES = 2


@pytest.fixture
def llm():
    with FakeAnthropicServer() as server:
        yield server
        server.assert_script_used()


@pytest.fixture(autouse=True)
def anthropic_settings(settings, llm):
    settings.AGENT_MODEL = "anthropic"
    settings.AGENT_ANTHROPIC_BASE_URL = llm.base_url
    settings.AGENT_ANTHROPIC_API_KEY = "sk-ant-test"
    settings.AGENT_ANTHROPIC_MODEL = "claude-fake"
    settings.AGENT_PROVIDER_MAX_RETRIES = MAX_RETRIES
    settings.AGENT_PROVIDER_TIMEOUT = 5.0
    return settings


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


async def test_tokens_stream_in_order_and_the_answer_and_usage_are_stored(llm, chat, settings):
    conversation, socket = chat
    answer = "Hello from the **fake** Claude, token by token!"
    llm.text(answer, input_tokens=42, output_tokens=11, cache_read_input_tokens=100)

    frames = await ask(socket, "Say hello", "run.completed")

    assert frames[0]["type"] == "run.started"
    assert frames[0]["model"] == f"claude-fake via {llm.base_url}"
    assert [f["text"] for f in of_type(frames, "token")] == split_tokens(answer)
    assert frames[-1]["messages"][0]["content"] == answer
    # langchain-anthropic counts cache reads as input tokens.
    usage = {"input_tokens": 142, "output_tokens": 11, "total_tokens": 153}
    assert frames[-1]["usage"] == usage
    run = await Run.objects.aget(conversation=conversation)
    assert (run.status, run.model, run.input_tokens, run.output_tokens) == (
        Run.Status.COMPLETED,
        "claude-fake",
        142,
        11,
    )
    stored = [(m.role, m.content) async for m in Message.objects.filter(conversation=conversation)]
    assert stored == [("user", "Say hello"), ("assistant", answer)]

    request = llm.last_request
    assert request.path == "/v1/messages"
    assert "sk-ant-test" in (
        request.headers.get("x-api-key", "") + request.headers.get("authorization", "")
    )
    body = request.body
    assert body["model"] == "claude-fake" and body["stream"] is True
    assert body["max_tokens"] == settings.AGENT_MAX_TOKENS
    system = body["system"] if isinstance(body["system"], str) else body["system"][0]["text"]
    assert system.startswith(SYSTEM_PROMPT.split("{now}")[0])
    assert [m["role"] for m in request.messages] == ["user"]
    assert request.tool_names == ["calculator", "current_time"]
    assert body["tools"][0]["input_schema"]["properties"]["expression"]["type"] == "string"


async def test_a_tool_use_runs_our_calculator_and_the_result_goes_back_to_the_model(llm, chat):
    conversation, socket = chat
    llm.tool_use(
        "calculator",
        {"expression": "17 * 23"},
        id="toolu_calc1",
        input_tokens=100,
        output_tokens=20,
    )
    llm.text("17 * 23 = **391**.", input_tokens=130, output_tokens=9)

    frames = await ask(socket, "What is 17 * 23?", "run.completed")

    started, finished = of_type(frames, "tool.started")[0], of_type(frames, "tool.finished")[0]
    assert started["tool_call_id"] == "toolu_calc1"
    assert started["name"] == "calculator" and started["args"] == {"expression": "17 * 23"}
    assert finished["result"] == "391" and finished["is_error"] is False
    assert streamed_text(frames) == "17 * 23 = **391**."

    assert len(llm.requests) == 2
    *_, assistant, user = llm.requests[1].messages
    assert assistant["role"] == "assistant"
    [tool_use] = [block for block in assistant["content"] if block["type"] == "tool_use"]
    assert tool_use["id"] == "toolu_calc1" and tool_use["name"] == "calculator"
    assert tool_use["input"] == {"expression": "17 * 23"}
    assert user["role"] == "user"
    [result] = user["content"]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_calc1"
    content = result["content"]
    assert content == "391" or json.dumps(content).count("391") == 1

    assert frames[-1]["usage"] == {"input_tokens": 230, "output_tokens": 29, "total_tokens": 259}
    run = await Run.objects.aget(conversation=conversation)
    assert (run.steps, run.input_tokens, run.output_tokens) == (2, 230, 29)


async def test_bad_credentials_fail_at_once_as_auth(llm, chat):
    conversation, socket = chat
    llm.error(401)

    frames = await ask(socket, "Hello?", "run.failed")

    run = await assert_failed(frames, "provider_auth", conversation)
    assert "invalid x-api-key" in run.error_message
    assert len(llm.requests) == 1
    await assert_socket_still_usable(llm, socket)


@pytest.mark.parametrize(
    ("status", "code"), [(529, "provider_unavailable"), (429, "provider_rate_limited")]
)
async def test_overload_and_rate_limits_are_retried_then_fail(llm, chat, status, code):
    conversation, socket = chat
    llm.error(status, times=MAX_RETRIES + 1)

    frames = await ask(socket, "Hello?", "run.failed")

    await assert_failed(frames, code, conversation)
    assert [r.retry_count for r in llm.requests] == list(range(MAX_RETRIES + 1))
    await assert_socket_still_usable(llm, socket)


async def test_an_overload_is_retried_and_the_run_completes(llm, chat):
    _, socket = chat
    llm.error(529)
    llm.text("Made it.")

    frames = await ask(socket, "Hello?", "run.completed")

    assert streamed_text(frames) == "Made it."
    assert len(llm.requests) == 2


async def test_an_overload_in_the_middle_of_the_stream_fails_as_unavailable(llm, chat):
    conversation, socket = chat
    llm.stream_error(text_before="Let me think")

    frames = await ask(socket, "Hello?", "run.failed")

    run = await assert_failed(frames, "provider_unavailable", conversation)
    assert "overloaded_error" in run.error_message
    assert streamed_text(frames) == "Let me think"
    await assert_socket_still_usable(llm, socket)


async def test_a_malformed_reply_fails_as_bad_response(llm, chat):
    conversation, socket = chat
    llm.malformed()

    frames = await ask(socket, "Hello?", "run.failed")

    await assert_failed(frames, "provider_bad_response", conversation)
    await assert_socket_still_usable(llm, socket)


async def test_a_provider_slower_than_the_timeout_fails_as_timeout(llm, chat, settings):
    conversation, socket = chat
    settings.AGENT_PROVIDER_TIMEOUT = 0.3
    settings.AGENT_PROVIDER_MAX_RETRIES = 1
    llm.slow(times=2)

    frames = await ask(socket, "Hello?", "run.failed")

    await assert_failed(frames, "provider_timeout", conversation)
    assert len(llm.requests) == 2
    settings.AGENT_PROVIDER_TIMEOUT = 5.0
    await assert_socket_still_usable(llm, socket)


async def test_a_stream_that_stalls_fails_as_timeout(llm, chat, settings):
    conversation, socket = chat
    settings.AGENT_PROVIDER_TIMEOUT = 0.3
    llm.text("One two three four", stall_after=2)

    frames = await ask(socket, "Count to four", "run.failed")

    run = await assert_failed(frames, "provider_timeout", conversation)
    assert streamed_text(frames) == "One two"
    partial = await Message.objects.aget(run=run, role=Message.Role.ASSISTANT)
    assert partial.content == "One two"
    settings.AGENT_PROVIDER_TIMEOUT = 5.0
    await assert_socket_still_usable(llm, socket)


async def test_a_connection_cut_mid_stream_fails_as_unreachable(llm, chat):
    conversation, socket = chat
    llm.text("One two three four", drop_after=3)

    frames = await ask(socket, "Count to four", "run.failed")

    await assert_failed(frames, "provider_unreachable", conversation)
    assert streamed_text(frames) == "One two three"
    await assert_socket_still_usable(llm, socket)
