"""The Anthropic provider path end to end: a user's message over the WebSocket, our graph,
langchain-anthropic and the anthropic SDK for real, against a real local HTTP server
speaking the Messages API wire format. The server is the only fake."""

import json
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async

from billing.models import ModelPrice
from chat.agent.prompts import SYSTEM_PROMPT
from chat.models import Message, Run
from chat.tests.provider_helpers import (
    MAX_RETRIES,
    calculator_step,
    ledger_rows,
    of_type,
    rejected_step,
    serve,
    streamed_text,
    unanswered_tool_calls,
)
from conftest import account_with_limits
from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.base import split_tokens
from tracing.models import Span

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
    # Where the provider (here a gateway) lives is the operator's business.
    assert frames[0]["model"] == "claude-fake via Anthropic"
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


async def test_input_tokens_reported_only_in_message_start_are_counted(llm, chat):
    llm.text(
        "Counted.",
        input_tokens=1234,
        output_tokens=5,
        cache_read_input_tokens=1000,
        input_in_message_delta=False,
    )

    frames = await chat.ask("Count my tokens", "run.completed")

    assert frames[-1]["usage"] == {"input_tokens": 2234, "output_tokens": 5, "total_tokens": 2239}
    [record] = await ledger_rows(chat)
    assert (record.input_tokens, record.cached_tokens, record.output_tokens) == (2234, 1000, 5)
    assert not record.usage_estimated


# -- broken streams -----------------------------------------------------------------------


async def test_a_stream_that_ends_early_fails_as_bad_response_and_keeps_what_was_seen(llm, chat):
    llm.text("One two three four", cut_after=2)

    frames, run = await chat.fails("Count to four", "provider_bad_response")

    await chat.assert_partial_answer(frames, run, "One two")
    assert len(llm.requests) == 1
    await chat.assert_still_usable()


async def test_a_stream_without_message_stop_fails_as_bad_response(llm, chat):
    llm.text("All of it, but no end.", message_stop=False)

    frames, run = await chat.fails("Hello?", "provider_bad_response")

    await chat.assert_partial_answer(frames, run, "All of it, but no end.")
    await chat.assert_still_usable()


async def test_a_stream_that_ends_before_any_content_is_asked_again(llm, chat):
    llm.text("Lost.", cut_after=0)
    llm.text("Found.", input_tokens=30, output_tokens=2)

    frames = await chat.ask("Hello?", "run.completed")

    assert streamed_text(frames) == "Found."
    assert len(llm.requests) == 2
    # The abandoned attempt's message_start usage is not counted.
    assert frames[-1]["usage"] == {"input_tokens": 30, "output_tokens": 2, "total_tokens": 32}


async def test_streams_that_keep_ending_before_any_content_fail_as_bad_response(llm, chat):
    llm.text("Lost.", cut_after=0, times=MAX_RETRIES + 1)

    await chat.fails("Hello?", "provider_bad_response")

    assert len(llm.requests) == MAX_RETRIES + 1
    await chat.assert_still_usable()


async def test_a_stream_cut_inside_a_tool_use_never_runs_the_tool(llm, chat):
    # The input stops at '{"expression": "1234 * 5'.
    llm.tool_use("calculator", {"expression": "1234 * 5678"}, id="toolu_cut", cut_after=4)

    frames, run = await chat.fails("What is 1234 * 5678?", "provider_bad_response")

    assert of_type(frames, "tool.started") == [] and of_type(frames, "tool.finished") == []
    assert not await Message.objects.filter(run=run, role=Message.Role.TOOL).aexists()
    await chat.assert_still_usable()
    assert unanswered_tool_calls(llm.last_request) == []


async def test_tool_input_cut_by_the_output_limit_is_not_run(llm, chat):
    llm.tool_use(
        "calculator", '{"expression": "1234 * 5', id="toolu_long", stop_reason="max_tokens"
    )
    llm.text("I ran out of room; 1234 * 5678 = 7006652.")

    frames = await chat.ask("What is 1234 * 5678?", "run.completed")

    await rejected_step(frames, "toolu_long", '{"expression": "1234 * 5')
    *_, assistant, user = llm.requests[1].messages
    [tool_use] = [b for b in assistant["content"] if b["type"] == "tool_use"]
    assert tool_use["id"] == "toolu_long" and tool_use["input"] == {}
    [result] = user["content"]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_long"
    assert "not complete" in json.dumps(result["content"])
    assert unanswered_tool_calls(llm.requests[1]) == []


async def test_tool_input_that_is_not_an_object_gets_an_error_the_model_can_act_on(llm, chat):
    llm.tool_use("calculator", '"17 * 23"', id="toolu_str")
    llm.text("Then directly: 17 * 23 = 391.")
    llm.text("You are welcome.")

    frames = await chat.ask("What is 17 * 23?", "run.completed")

    assert streamed_text(frames) == "Then directly: 17 * 23 = 391."
    await rejected_step(frames, "toolu_str", '"17 * 23"')
    *_, assistant, user = llm.requests[1].messages
    [tool_use] = [b for b in assistant["content"] if b["type"] == "tool_use"]
    # Anthropic accepts only an object as a tool's input, in history too.
    assert tool_use["id"] == "toolu_str" and tool_use["input"] == {}
    [result] = user["content"]
    assert result["tool_use_id"] == "toolu_str" and "JSON object" in json.dumps(result)
    await chat.ask("Thanks", "run.completed")
    assert unanswered_tool_calls(llm.last_request) == []


async def test_a_stream_without_usage_is_billed_an_estimate_flagged_as_such(llm, chat):
    await ModelPrice.objects.acreate(
        model="claude-fake", input_per_mtok=Decimal(3), output_per_mtok=Decimal(15)
    )
    llm.text("An answer of a few words, with no usage after it.", usage_reported=False)

    frames = await chat.ask("Hello?", "run.completed")

    [record] = await ledger_rows(chat)
    assert record.usage_estimated
    assert record.input_tokens > 100 and record.output_tokens >= 10
    assert record.cost_usd is not None and record.cost_usd > 0
    assert frames[-1]["usage"]["total_tokens"] == record.input_tokens + record.output_tokens


# -- budgets ------------------------------------------------------------------------------


async def test_a_call_the_budget_cannot_fully_cover_is_made_with_a_lower_output_cap(
    llm, chat, settings
):
    await ModelPrice.objects.acreate(
        model="claude-fake", input_per_mtok=Decimal(1), output_per_mtok=Decimal(10)
    )
    limit = Decimal("0.005")
    user = await database_sync_to_async(lambda: chat.conversation.owner)()
    await database_sync_to_async(account_with_limits)(user, money_per_day_usd=limit)
    llm.text("Short.")

    await chat.ask("Hello?", "run.completed")

    cap = llm.last_request.body["max_tokens"]
    assert settings.AGENT_MIN_OUTPUT_TOKENS <= cap < settings.AGENT_MAX_TOKENS
    [record] = await ledger_rows(chat)
    assert record.reserved_usd is not None and record.reserved_usd <= limit
    span = await Span.objects.aget(id=record.span_id)
    assert span.attributes["max_output_tokens"] == {
        "requested": settings.AGENT_MAX_TOKENS,
        "granted": cap,
    }


async def test_an_answer_cut_at_the_budget_cap_ends_as_budget_exceeded(llm, chat, settings):
    await ModelPrice.objects.acreate(
        model="claude-fake", input_per_mtok=Decimal(1), output_per_mtok=Decimal(10)
    )
    user = await database_sync_to_async(lambda: chat.conversation.owner)()
    await database_sync_to_async(account_with_limits)(user, money_per_run_usd=Decimal("0.005"))
    llm.text("The start of a long answer", stop_reason="max_tokens")

    frames = await chat.ask("Tell me everything", "run.budget_exceeded")

    assert streamed_text(frames) == "The start of a long answer"
    assert "cut short" in frames[-1]["error"]["message"]
    [record] = await ledger_rows(chat)
    assert record.cost_usd is not None and record.cost_usd > 0
