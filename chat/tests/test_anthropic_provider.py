"""The Anthropic provider path end to end: a user's message over the WebSocket, our graph,
langchain-anthropic and the anthropic SDK for real, against a real local HTTP server
speaking the Messages API wire format. The server is the only fake."""

import json

import pytest

from chat.agent.prompts import SYSTEM_PROMPT
from chat.models import Run
from chat.tests.provider_helpers import MAX_RETRIES, calculator_step, of_type, serve, streamed_text
from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.base import split_tokens

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def llm(settings):
    yield from serve(
        FakeAnthropicServer, settings, "anthropic", api_key="sk-ant-test", model="claude-fake"
    )


async def test_tokens_stream_in_order_and_the_answer_and_usage_are_stored(llm, chat, settings):
    answer = "Hello from the **fake** Claude, token by token!"
    llm.text(answer, input_tokens=42, output_tokens=11, cache_read_input_tokens=100)

    frames = await chat.ask("Say hello", "run.completed")

    assert frames[0]["type"] == "run.started"
    assert frames[0]["model"] == f"claude-fake via {llm.base_url}"
    assert [f["text"] for f in of_type(frames, "token")] == split_tokens(answer)
    assert frames[-1]["messages"][0]["content"] == answer
    # langchain-anthropic counts cache reads as input tokens.
    usage = {"input_tokens": 142, "output_tokens": 11, "total_tokens": 153}
    assert frames[-1]["usage"] == usage
    run = await Run.objects.aget(conversation=chat.conversation)
    assert (run.status, run.model, run.input_tokens, run.output_tokens) == (
        Run.Status.COMPLETED,
        "claude-fake",
        142,
        11,
    )
    assert await chat.stored() == [("user", "Say hello"), ("assistant", answer)]

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
    calculation = {"expression": "17 * 23"}
    llm.tool_use("calculator", calculation, id="toolu_calc1", input_tokens=100, output_tokens=20)
    llm.text("17 * 23 = **391**.", input_tokens=130, output_tokens=9)

    frames = await chat.ask("What is 17 * 23?", "run.completed")

    calculator_step(frames, "toolu_calc1")

    assert len(llm.requests) == 2
    *_, assistant, user = llm.requests[1].messages
    assert assistant["role"] == "assistant"
    [tool_use] = [block for block in assistant["content"] if block["type"] == "tool_use"]
    assert tool_use["id"] == "toolu_calc1" and tool_use["name"] == "calculator"
    assert tool_use["input"] == calculation
    assert user["role"] == "user"
    [result] = user["content"]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_calc1"
    content = result["content"]
    assert content == "391" or json.dumps(content).count("391") == 1

    assert frames[-1]["usage"] == {"input_tokens": 230, "output_tokens": 29, "total_tokens": 259}
    run = await Run.objects.aget(conversation=chat.conversation)
    assert (run.steps, run.input_tokens, run.output_tokens) == (2, 230, 29)


async def test_bad_credentials_fail_at_once_as_auth(llm, chat):
    llm.error(401)

    _, run = await chat.fails("Hello?", "provider_auth")

    assert "invalid x-api-key" in run.error_message
    assert len(llm.requests) == 1
    await chat.assert_still_usable()


@pytest.mark.parametrize(
    ("status", "code"), [(529, "provider_unavailable"), (429, "provider_rate_limited")]
)
async def test_overload_and_rate_limits_are_retried_then_fail(llm, chat, status, code):
    llm.error(status, times=MAX_RETRIES + 1)

    await chat.fails("Hello?", code)

    assert [r.retry_count for r in llm.requests] == list(range(MAX_RETRIES + 1))
    await chat.assert_still_usable()


async def test_an_overload_is_retried_and_the_run_completes(llm, chat):
    llm.error(529)
    llm.text("Made it.")

    frames = await chat.ask("Hello?", "run.completed")

    assert streamed_text(frames) == "Made it."
    assert len(llm.requests) == 2


async def test_an_overload_in_the_middle_of_the_stream_fails_as_unavailable(llm, chat):
    llm.stream_error(text_before="Let me think")

    frames, run = await chat.fails("Hello?", "provider_unavailable")

    assert "overloaded_error" in run.error_message
    assert streamed_text(frames) == "Let me think"
    await chat.assert_still_usable()


async def test_a_malformed_reply_fails_as_bad_response(llm, chat):
    llm.malformed()

    await chat.fails("Hello?", "provider_bad_response")

    await chat.assert_still_usable()


async def test_a_provider_slower_than_the_timeout_fails_as_timeout(llm, chat, settings):
    settings.AGENT_PROVIDER_MAX_RETRIES = 1
    llm.slow(times=2)

    await chat.times_out("Hello?")

    assert len(llm.requests) == 2
    await chat.assert_still_usable()


async def test_a_stream_that_stalls_fails_as_timeout(llm, chat):
    llm.text("One two three four", stall_after=2)

    frames, run = await chat.times_out("Count to four")

    await chat.assert_partial_answer(frames, run, "One two")
    await chat.assert_still_usable()


async def test_a_connection_cut_mid_stream_fails_as_unreachable(llm, chat):
    llm.text("One two three four", drop_after=3)

    frames, _ = await chat.fails("Count to four", "provider_unreachable")

    assert streamed_text(frames) == "One two three"
    await chat.assert_still_usable()
