"""The OpenAI provider path end to end: a user's message over the WebSocket, our graph,
langchain-openai and the openai SDK for real, against a real local HTTP server speaking
the Chat Completions wire format. The server is the only fake."""

import json
import socket as sockets
from typing import Any

import pytest

from chat.agent.prompts import SYSTEM_PROMPT
from chat.models import Message, Run
from chat.tests.provider_helpers import MAX_RETRIES, calculator_step, of_type, serve, streamed_text
from tests.fakes.base import split_tokens
from tests.fakes.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.django_db(transaction=True)

SYSTEM_PROMPT_START = SYSTEM_PROMPT.split("{now}")[0]


@pytest.fixture(autouse=True)
def llm(settings):
    yield from serve(FakeOpenAIServer, settings, "openai", api_key="sk-test", model="gpt-fake-mini")


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


# -- answers ------------------------------------------------------------------------------


async def test_tokens_stream_in_order_and_the_answer_is_stored(llm, chat):
    answer = "Hello from the **fake** provider, token by token!"
    llm.text(answer, prompt_tokens=42, completion_tokens=11)

    frames = await chat.ask("Say hello", "run.completed")

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

    run = await Run.objects.aget(conversation=chat.conversation)
    assert run.status == Run.Status.COMPLETED
    assert run.model == "gpt-fake-mini"
    assert run.steps == 1
    assert await chat.stored() == [("user", "Say hello"), ("assistant", answer)]


async def test_provider_usage_reaches_run_completed_and_the_run_row(llm, chat):
    llm.text("Counted.", prompt_tokens=1234, completion_tokens=56, cached_tokens=1000)

    frames = await chat.ask("Count my tokens", "run.completed")

    usage = {"input_tokens": 1234, "output_tokens": 56, "total_tokens": 1290}
    assert [{k: f[k] for k in usage} for f in of_type(frames, "usage")] == [usage]
    assert frames[-1]["usage"] == usage
    run = await Run.objects.aget(conversation=chat.conversation)
    assert (run.input_tokens, run.output_tokens, run.total_tokens) == (1234, 56, 1290)


async def test_request_carries_model_settings_system_prompt_tools_and_user_message(
    llm, chat, settings
):
    llm.text("Noted.")

    await chat.ask("Remember: the sky is green.", "run.completed")

    request = llm.last_request
    assert request.method == "POST" and request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = request.body
    assert body["model"] == "gpt-fake-mini"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == settings.AGENT_TEMPERATURE
    # Both spellings of the output limit, for servers that know only one of them.
    assert body["max_completion_tokens"] == body["max_tokens"] == settings.AGENT_MAX_TOKENS
    system, user = request.messages
    assert system["role"] == "system" and system["content"].startswith(SYSTEM_PROMPT_START)
    assert user == {"role": "user", "content": "Remember: the sky is green."}
    assert request.tool_names == ["calculator", "current_time"]
    calculator = request.body["tools"][0]["function"]
    assert "arithmetic" in calculator["description"]
    assert calculator["parameters"]["properties"]["expression"]["type"] == "string"
    assert calculator["parameters"]["required"] == ["expression"]


async def test_the_next_turn_sends_the_conversation_so_far(llm, chat):
    llm.text("Noted: the sky is green.")
    llm.text("You said it is green.")

    await chat.ask("Remember: the sky is green.", "run.completed")
    await chat.ask("What colour is the sky?", "run.completed")

    first, second = llm.requests
    assert second.messages[0]["role"] == "system"
    assert [(m["role"], m["content"]) for m in second.messages[1:]] == [
        ("user", "Remember: the sky is green."),
        ("assistant", "Noted: the sky is green."),
        ("user", "What colour is the sky?"),
    ]
    assert len(first.messages) == 2


async def test_a_tool_call_runs_our_calculator_and_the_result_goes_back_to_the_model(llm, chat):
    calculation = {"expression": "17 * 23"}
    llm.tool_call(
        "calculator", calculation, id="call_calc1", prompt_tokens=100, completion_tokens=20
    )
    llm.text("17 * 23 = **391**.", prompt_tokens=130, completion_tokens=9)

    frames = await chat.ask("What is 17 * 23?", "run.completed")

    types = [f["type"] for f in frames]
    assert types.index("tool.started") < types.index("tool.finished") < types.index("token")
    _, finished = calculator_step(frames, "call_calc1")
    assert finished["tool_call_id"] == "call_calc1"

    # The second request carries the model's call and our tool's result.
    assert len(llm.requests) == 2
    *_, call_message, result_message = llm.requests[1].messages
    assert call_message["role"] == "assistant"
    [call] = call_message["tool_calls"]
    assert call["id"] == "call_calc1" and call["type"] == "function"
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == calculation
    assert result_message == {"role": "tool", "tool_call_id": "call_calc1", "content": "391"}

    # Usage of both model calls is added up.
    total = {"input_tokens": 230, "output_tokens": 29, "total_tokens": 259}
    assert len(of_type(frames, "usage")) == 2
    assert frames[-1]["usage"] == total
    run = await Run.objects.aget(conversation=chat.conversation)
    assert (run.status, run.steps, run.input_tokens, run.output_tokens) == (
        Run.Status.COMPLETED,
        2,
        230,
        29,
    )
    stored = [m async for m in Message.objects.filter(conversation=chat.conversation)]
    assert [m.role for m in stored] == ["user", "tool", "assistant"]
    assert stored[1].tool == {
        "tool_call_id": "call_calc1",
        "name": "calculator",
        "args": calculation,
        "result": "391",
        "is_error": False,
    }


async def test_bad_tool_input_from_the_model_is_reported_back_to_it(llm, chat):
    llm.tool_call("calculator", {"expression": "import os"}, id="call_bad")
    llm.text("Sorry, I cannot compute that.")

    frames = await chat.ask("Compute something odd", "run.completed")

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
    llm.error(status, "Nope, says the provider.")

    _, run = await chat.fails("Hello?", code)

    assert "Nope, says the provider." in run.error_message
    assert len(llm.requests) == 1
    await chat.assert_still_usable()


async def test_rate_limiting_is_retried_then_fails_as_rate_limited(llm, chat):
    llm.error(429, times=MAX_RETRIES + 1)

    await chat.fails("Hello?", "provider_rate_limited")

    assert [r.retry_count for r in llm.requests] == list(range(MAX_RETRIES + 1))
    await chat.assert_still_usable()


async def test_a_server_error_is_retried_and_the_run_completes(llm, chat):
    llm.error(500)
    llm.error(503)
    llm.text("Third time lucky.", prompt_tokens=10, completion_tokens=4)

    frames = await chat.ask("Hello?", "run.completed")

    assert streamed_text(frames) == "Third time lucky."
    assert [r.retry_count for r in llm.requests] == [0, 1, 2]
    # The retried requests are the same request.
    assert llm.requests[0].body == llm.requests[2].body
    run = await Run.objects.aget(conversation=chat.conversation)
    assert run.status == Run.Status.COMPLETED and run.total_tokens == 14


async def test_persistent_server_errors_fail_as_unavailable(llm, chat):
    llm.error(500, "The server is on fire.", times=MAX_RETRIES + 1)

    _, run = await chat.fails("Hello?", "provider_unavailable")

    assert "The server is on fire." in run.error_message
    assert len(llm.requests) == MAX_RETRIES + 1
    await chat.assert_still_usable()


async def test_an_error_in_the_middle_of_the_stream_fails_as_unavailable(llm, chat):
    llm.stream_error("Something broke mid-answer.", text_before="Let me think")

    frames, run = await chat.fails("Hello?", "provider_unavailable")

    assert "Something broke mid-answer." in run.error_message
    # What the user already saw is kept with the failed run.
    await chat.assert_partial_answer(frames, run, "Let me think")
    await chat.assert_still_usable()


async def test_a_malformed_reply_fails_as_bad_response(llm, chat):
    llm.malformed()

    await chat.fails("Hello?", "provider_bad_response")

    assert len(llm.requests) == 1
    await chat.assert_still_usable()


async def test_a_provider_slower_than_the_timeout_fails_as_timeout(llm, chat, settings):
    settings.AGENT_PROVIDER_MAX_RETRIES = 1
    llm.slow(times=2)

    await chat.times_out("Hello?")

    assert [r.retry_count for r in llm.requests] == [0, 1]
    await chat.assert_still_usable()


async def test_a_stream_that_stalls_fails_as_timeout_and_keeps_the_partial_answer(llm, chat):
    llm.text("One two three four", stall_after=2)

    frames, run = await chat.times_out("Count to four")

    await chat.assert_partial_answer(frames, run, "One two")
    # A stream that already started is not retried by the SDK.
    assert len(llm.requests) == 1
    await chat.assert_still_usable()


async def test_a_stream_kept_alive_without_content_fails_as_timeout(llm, chat):
    llm.text("One two three four", keepalive_after=2)

    frames, _ = await chat.times_out("Count to four")

    assert streamed_text(frames) == "One two"
    await chat.assert_still_usable()


async def test_a_connection_cut_mid_stream_fails_as_unreachable(llm, chat):
    llm.text("One two three four", drop_after=3)

    frames, _ = await chat.fails("Count to four", "provider_unreachable")

    assert streamed_text(frames) == "One two three"
    assert len(llm.requests) == 1
    await chat.assert_still_usable()


async def test_an_unreachable_server_fails_as_unreachable(llm, chat, settings):
    settings.AGENT_PROVIDER_MAX_RETRIES = 1
    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings.AGENT_OPENAI_BASE_URL = f"http://127.0.0.1:{closed_port}/v1"

    _, run = await chat.fails("Hello?", "provider_unreachable")

    assert "connect" in run.error_message.lower()
    assert llm.requests == []
    settings.AGENT_OPENAI_BASE_URL = llm.base_url
    await chat.assert_still_usable()
