"""The OpenAI provider path end to end: a user's message over the WebSocket, our graph,
langchain-openai and the openai SDK for real, against a real local HTTP server speaking
the Chat Completions wire format. The server is the only fake."""

import asyncio
import json
import socket as sockets
from decimal import Decimal
from typing import Any

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
from conftest import account_with_limits, wait_for_runs
from tests.fakes.base import split_tokens
from tests.fakes.openai_server import FakeOpenAIServer
from tracing.models import Span

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
    # Where the provider lives is the operator's business, not the browser's.
    assert frames[0]["model"] == "gpt-fake-mini via an OpenAI-compatible server"
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


# -- broken streams -----------------------------------------------------------------------


async def test_a_stream_that_ends_early_fails_as_bad_response_and_keeps_what_was_seen(llm, chat):
    llm.text("One two three four", cut_after=2)

    frames, run = await chat.fails("Count to four", "provider_bad_response")

    await chat.assert_partial_answer(frames, run, "One two")
    assert "before the end of its answer" in run.error_message
    # Something was streamed, so it is not asked again.
    assert len(llm.requests) == 1
    # The provider had the prompt and sent two tokens, and reported nothing: billed an
    # estimate, flagged.
    [record] = await ledger_rows(chat)
    assert record.usage_estimated and record.input_tokens > 100 and record.output_tokens == 2
    await chat.assert_still_usable()


async def test_a_stream_that_ends_before_any_content_is_asked_again(llm, chat):
    llm.text("Lost.", cut_after=0)
    llm.text("Found.")

    frames = await chat.ask("Hello?", "run.completed")

    assert streamed_text(frames) == "Found."
    assert len(llm.requests) == 2 and llm.requests[0].body == llm.requests[1].body


async def test_streams_that_keep_ending_before_any_content_fail_as_bad_response(llm, chat):
    llm.text("Lost.", cut_after=0, times=MAX_RETRIES + 1)

    await chat.fails("Hello?", "provider_bad_response")

    assert len(llm.requests) == MAX_RETRIES + 1
    await chat.assert_still_usable()


async def test_a_stream_cut_inside_a_tool_call_never_runs_the_tool(llm, chat):
    # The arguments stop at '{"expression": "1234 * 5'.
    llm.tool_call("calculator", {"expression": "1234 * 5678"}, id="call_cut", cut_after=4)

    frames, run = await chat.fails("What is 1234 * 5678?", "provider_bad_response")

    assert of_type(frames, "tool.started") == [] and of_type(frames, "tool.finished") == []
    assert not await Message.objects.filter(run=run, role=Message.Role.TOOL).aexists()
    await chat.assert_still_usable()
    assert unanswered_tool_calls(llm.last_request) == []


async def test_tool_arguments_cut_by_the_output_limit_are_not_run(llm, chat):
    llm.tool_call("calculator", '{"expression": "1234 * 5', id="call_long", finish_reason="length")
    llm.text("I ran out of room; 1234 * 5678 = 7006652.")

    frames = await chat.ask("What is 1234 * 5678?", "run.completed")

    await rejected_step(frames, "call_long", '{"expression": "1234 * 5')
    assert streamed_text(frames) == "I ran out of room; 1234 * 5678 = 7006652."
    result = llm.requests[1].messages[-1]
    assert result["role"] == "tool" and result["tool_call_id"] == "call_long"
    assert "not complete" in result["content"] and "calculator" in result["content"]
    assert unanswered_tool_calls(llm.requests[1]) == []


async def test_tool_arguments_that_are_not_an_object_get_an_error_the_model_can_act_on(llm, chat):
    llm.tool_call("calculator", '"17 * 23"', id="call_str")
    llm.text("Then directly: 17 * 23 = 391.")
    llm.text("You are welcome.")

    frames = await chat.ask("What is 17 * 23?", "run.completed")

    assert streamed_text(frames) == "Then directly: 17 * 23 = 391."
    await rejected_step(frames, "call_str", '"17 * 23"')
    call, result = llm.requests[1].messages[-2:]
    assert [c["id"] for c in call["tool_calls"]] == ["call_str"]
    assert result["role"] == "tool" and result["tool_call_id"] == "call_str"
    assert result["content"].startswith("Error: ") and "JSON object" in result["content"]
    # The next turn's history is one a real provider accepts.
    await chat.ask("Thanks", "run.completed")
    assert unanswered_tool_calls(llm.last_request) == []


async def test_a_stream_without_usage_is_billed_an_estimate_flagged_as_such(llm, chat):
    await ModelPrice.objects.acreate(
        model="gpt-fake-mini", input_per_mtok=Decimal(1), output_per_mtok=Decimal(10)
    )
    llm.text("An answer of a few words, with no usage after it.", usage_reported=False)

    frames = await chat.ask("Hello?", "run.completed")

    [record] = await ledger_rows(chat)
    assert record.usage_estimated
    assert record.input_tokens > 100 and record.output_tokens >= 10
    assert record.cost_usd is not None and record.cost_usd > 0
    run = await Run.objects.aget(conversation=chat.conversation)
    assert (run.input_tokens, run.output_tokens) == (record.input_tokens, record.output_tokens)
    assert frames[-1]["usage"]["total_tokens"] == run.total_tokens


# -- budgets ------------------------------------------------------------------------------


async def test_a_call_the_budget_cannot_fully_cover_is_made_with_a_lower_output_cap(
    llm, chat, settings
):
    await ModelPrice.objects.acreate(
        model="gpt-fake-mini", input_per_mtok=Decimal(1), output_per_mtok=Decimal(10)
    )
    # A run may cost $0.005: a prompt of well under 2,000 tokens and ~300+ of output.
    limit = Decimal("0.005")
    user = await database_sync_to_async(lambda: chat.conversation.owner)()
    await database_sync_to_async(account_with_limits)(user, money_per_run_usd=limit)
    llm.text("Short.")

    await chat.ask("Hello?", "run.completed")

    body = llm.last_request.body
    cap = body["max_completion_tokens"]
    assert body["max_tokens"] == cap
    assert settings.AGENT_MIN_OUTPUT_TOKENS <= cap < settings.AGENT_MAX_TOKENS
    [record] = await ledger_rows(chat)
    assert record.reserved_usd is not None and record.reserved_usd <= limit
    span = await Span.objects.aget(id=record.span_id)
    assert span.attributes["max_output_tokens"] == {
        "requested": settings.AGENT_MAX_TOKENS,
        "granted": cap,
    }


# -- a run that brings earlier turns (the OpenAI-compatible endpoint's) -------------------


async def test_a_run_feeds_the_history_it_brings_and_the_callers_instructions(llm, make_user):
    from chat import lifecycle, services

    user = await database_sync_to_async(make_user)()
    await database_sync_to_async(account_with_limits)(user)
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    llm.text("Sixteen.")
    history = [
        services.Turn("user", "Let us count in English words."),
        services.Turn("assistant", "Fine: one, two, three."),
    ]
    run = await database_sync_to_async(services.run_create)(
        conversation=conversation,
        content="What comes after fifteen?",
        history=history,
        instructions="Answer in one word.",
    )
    await asyncio.wait_for(wait_for_runs(), timeout=30)

    sent = llm.requests[0].messages
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[0]["content"].startswith(SYSTEM_PROMPT_START)
    assert sent[0]["content"].endswith("Answer in one word.")
    assert [m["content"] for m in sent[1:]] == [
        "Let us count in English words.",
        "Fine: one, two, three.",
        "What comes after fifteen?",
    ]
    await run.arefresh_from_db()
    assert run.status == Run.Status.COMPLETED
    await conversation.arefresh_from_db()
    assert conversation.title == "Let us count in English words."
    stored = [
        (m.role, m.imported, m.content)
        async for m in Message.objects.filter(conversation=conversation)
    ]
    assert stored == [
        ("user", True, "Let us count in English words."),
        ("assistant", True, "Fine: one, two, three."),
        ("user", False, "What comes after fifteen?"),
        ("assistant", False, "Sixteen."),
    ]
    # The run's own answer is what it wrote, not the turns it was given.
    rebuilt = await database_sync_to_async(lifecycle.run_final_event_rebuilt)(run=run)
    assert [m["content"] for m in rebuilt["messages"]] == ["Sixteen."]


async def test_a_callers_instructions_end_with_its_run(llm, make_user):
    """Instructions belong to the run that brought them: a later run in the same
    conversation without any (a browser message, a bound OpenAI request with no system
    message) is given none, not the earlier caller's."""
    from chat import services

    user = await database_sync_to_async(make_user)()
    await database_sync_to_async(account_with_limits)(user)
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    llm.text("One.")
    llm.text("Two.")
    await database_sync_to_async(services.run_create)(
        conversation=conversation, content="Count.", instructions="Answer in French."
    )
    await asyncio.wait_for(wait_for_runs(), timeout=30)
    await database_sync_to_async(services.run_create)(conversation=conversation, content="Again.")
    await asyncio.wait_for(wait_for_runs(), timeout=30)

    first, second = (request.messages[0]["content"] for request in llm.requests)
    assert first.endswith("Answer in French.")
    assert "Answer in French." not in second
    assert second.startswith(SYSTEM_PROMPT_START)


async def test_a_turn_of_history_that_is_not_text_is_refused_by_its_index(make_user):
    from agentsite.errors import ApplicationError
    from chat import services

    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    with pytest.raises(ApplicationError) as refused:
        await database_sync_to_async(services.run_create)(
            conversation=conversation,
            content="And now?",
            history=[services.Turn("user", "Hi"), services.Turn("assistant", "  ")],
        )
    assert refused.value.code == "empty_message"
    assert refused.value.extra == {"turn": 1}
    with pytest.raises(ApplicationError) as refused:
        await database_sync_to_async(services.run_create)(
            conversation=conversation, content="And now?", instructions="x" * 9000
        )
    assert (refused.value.code, refused.value.extra) == ("message_too_long", {"instructions": True})
    assert not await Run.objects.filter(conversation=conversation).aexists()
