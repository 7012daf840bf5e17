import logging
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async

from agentsite.logging import ContextFilter
from billing.models import ModelPrice, UsageRecord
from chat import services
from chat.models import Run
from conftest import cancelled_mid_answer, open_socket, receive_until, wait_for_runs
from tracing.export import otel_span_id
from tracing.models import Span, Trace
from tracing.selectors import trace_flatten, trace_tree

pytestmark = pytest.mark.django_db(transaction=True)


async def run_message(user, content, until="run.completed"):
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    await socket.send_json_to({"type": "message", "content": content})
    frames = await receive_until(socket, until)
    await socket.disconnect()
    await wait_for_runs()
    run = await Run.objects.aget(conversation=conversation)
    return run, frames, socket


def shape(trace):
    return [
        ("  " * node.depth) + f"{node.span.kind}:{node.span.name}:{node.span.status}"
        for node in trace_flatten(roots=trace_tree(trace=trace))
    ]


async def test_a_multi_tool_run_records_the_whole_tree(make_user):
    user = await database_sync_to_async(make_user)()
    run, frames, _ = await run_message(user, "What is 2*3 and 4*5 and 6*7?")
    assert [f["name"] for f in frames if f["type"] == "tool.started"] == ["calculator"] * 3

    trace = await Trace.objects.aget(run=run)
    assert trace.user_id == user.id and trace.status == "ok"
    tree = await database_sync_to_async(shape)(trace)
    assert tree == [
        "run:run:ok",
        "  node:call_model:ok",
        "    llm:agentsite-offline-demo:ok",
        "  node:tools:ok",
        "    tool:calculator:ok",
        "    tool:calculator:ok",
        "    tool:calculator:ok",
        "  node:call_model:ok",
        "    llm:agentsite-offline-demo:ok",
    ]
    spans = [s async for s in Span.objects.filter(trace=trace)]
    assert trace.span_count == len(spans) == 9
    llm = [s for s in spans if s.kind == "llm"]
    assert trace.input_tokens == sum(s.input_tokens for s in llm) == run.input_tokens
    assert trace.output_tokens == run.output_tokens > 0
    answer = llm[-1].attributes
    assert answer["provider"] and answer["model"] == "agentsite-offline-demo"
    assert answer["prompt"][0]["role"] == "system"
    assert "42" in answer["completion"]["content"]
    assert answer["finish_reason"] == "stop"
    assert answer["time_to_first_token_ms"] >= 0
    first_call = llm[0].attributes["completion"]["tool_calls"]
    assert [c["args"] for c in first_call] == [
        {"expression": "2*3"},
        {"expression": "4*5"},
        {"expression": "6*7"},
    ]
    tools = sorted(
        (s.attributes["arguments"]["expression"], s.attributes["result"])
        for s in spans
        if s.kind == "tool"
    )
    assert tools == [("2*3", "6"), ("4*5", "20"), ("6*7", "42")]
    root = next(s for s in spans if s.kind == "run")
    assert all(root.started_at <= s.started_at <= s.ended_at <= root.ended_at for s in spans)
    assert trace.duration_ms == pytest.approx(root.duration_ms, abs=1)


async def test_an_llm_span_records_the_system_prompt_and_the_last_messages_of_its_prompt(
    make_user, settings
):
    # A call's prompt is the conversation so far: recorded whole, every turn's trace
    # would cost more than the last, for ever.
    settings.TRACING_MAX_PROMPT_MESSAGES = 3
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    for question in ("What is 2*3?", "What is 4*5?"):
        await socket.send_json_to({"type": "message", "content": question})
        await receive_until(socket, "run.completed")
    await socket.disconnect()
    await wait_for_runs()

    last = await Run.objects.filter(conversation=conversation).alatest("created_at")
    spans = [s async for s in Span.objects.filter(trace_id=last.id, kind="llm")]
    answer = max(spans, key=lambda span: span.started_at).attributes
    # The system prompt, then the last three: the question, the tool call, its result.
    # Left out: the first turn's question, tool call, result and answer.
    assert [m["role"] for m in answer["prompt"]] == ["system", "human", "ai", "tool"]
    assert answer["prompt"][1]["content"] == "What is 4*5?"
    assert answer["prompt_omitted"] == 4

    settings.TRACING_MAX_PROMPT_MESSAGES = 0
    run, _, _ = await run_message(user, "What is 6*7?")
    whole = await Span.objects.filter(trace_id=run.id, kind="llm").alatest("started_at")
    assert len(whole.attributes["prompt"]) == 4 and "prompt_omitted" not in whole.attributes


async def test_a_cancelled_run_closes_its_open_spans_as_cancelled(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    conversation = await cancelled_mid_answer(user)

    trace = await Trace.objects.aget(run__conversation=conversation)
    assert trace.status == "cancelled" and trace.error_type == "cancelled"
    tree = await database_sync_to_async(shape)(trace)
    assert tree == [
        "run:run:cancelled",
        "  node:call_model:cancelled",
        "    llm:agentsite-offline-demo:cancelled",
    ]
    assert not await Span.objects.filter(trace=trace, ended_at__isnull=True).aexists()


async def test_a_cancelled_call_has_the_tokens_the_ledger_billed(make_user, settings):
    # The provider never reports usage for a call cut short; the ledger bills what was
    # streamed. The span, the trace (the trace page, /traces/) and the run all say so.
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    conversation = await cancelled_mid_answer(user)

    run = await Run.objects.aget(conversation=conversation)
    trace = await Trace.objects.aget(run=run)
    [billed] = [row async for row in UsageRecord.objects.filter(run_id=run.id)]
    span = await Span.objects.aget(trace=trace, kind="llm")
    assert span.id == billed.span_id and span.status == "cancelled"
    assert (span.input_tokens, span.output_tokens) == (billed.input_tokens, billed.output_tokens)
    assert billed.input_tokens > 0 and billed.output_tokens > 0
    assert (trace.input_tokens, trace.output_tokens) == (run.input_tokens, run.output_tokens)
    assert (run.input_tokens, run.output_tokens) == (billed.input_tokens, billed.output_tokens)


async def test_spans_written_early_get_the_ledger_cost_and_tokens(make_user, settings):
    await ModelPrice.objects.aupdate_or_create(
        model="agentsite-offline-demo",
        defaults={"input_per_mtok": Decimal("2"), "output_per_mtok": Decimal("8")},
    )
    settings.TRACING_FLUSH_BATCH = 1  # each LLM span is written as soon as it ends
    settings.TRACING_RUNNING_VISIBLE_AFTER = 0.0
    user = await database_sync_to_async(make_user)()
    run, _, _ = await run_message(user, "What is 2*3?")
    ledger = {
        row.span_id: (row.input_tokens, row.output_tokens, row.cost_usd)
        async for row in UsageRecord.objects.filter(run_id=run.id)
    }
    spans = {
        span.id: (span.input_tokens, span.output_tokens, span.cost_usd)
        async for span in Span.objects.filter(trace_id=run.id, kind="llm")
    }
    assert len(ledger) == 2 and spans == ledger
    assert all(cost > 0 for _, _, cost in ledger.values())


async def test_a_failed_run_records_the_error_on_the_llm_span(make_user, settings):
    settings.AGENT_MODEL = "openai"
    settings.AGENT_OPENAI_BASE_URL = "http://127.0.0.1:9/v1"  # nothing listens there
    settings.AGENT_PROVIDER_MAX_RETRIES = 0
    user = await database_sync_to_async(make_user)()
    run, frames, _ = await run_message(user, "hello", until="run.failed")
    assert frames[-1]["error"]["code"] == "provider_unreachable"

    trace = await Trace.objects.aget(run=run)
    assert trace.status == "error" and trace.error_type == "provider_unreachable"
    tree = await database_sync_to_async(shape)(trace)
    assert tree == [
        "run:run:error",
        "  node:call_model:error",
        "    llm:gpt-4.1-mini:error",
    ]
    llm = await Span.objects.aget(trace=trace, kind="llm")
    assert llm.error_type and llm.error_message
    assert llm.attributes["request"]["temperature"] == settings.AGENT_TEMPERATURE


async def test_tracing_can_be_switched_off(make_user, settings):
    settings.TRACING_ENABLED = False
    user = await database_sync_to_async(make_user)()
    run, _, _ = await run_message(user, "What is 2*3?")
    assert run.status == Run.Status.COMPLETED
    assert not await Trace.objects.filter(run=run).aexists()


async def test_spans_are_flushed_in_batches_during_a_long_run(make_user, settings):
    settings.TRACING_FLUSH_BATCH = 2
    settings.TRACING_RUNNING_VISIBLE_AFTER = 0.0
    user = await database_sync_to_async(make_user)()
    run, _, _ = await run_message(user, "What is 2*3 and 4*5 and 6*7?")
    trace = await Trace.objects.aget(run=run)
    assert trace.status == "ok"
    assert await Span.objects.filter(trace=trace).acount() == trace.span_count == 9


async def test_a_timed_out_run_closes_its_spans_as_errors_of_the_timeout(make_user, settings):
    settings.AGENT_RUN_TIMEOUT = 0.3
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    run, _, _ = await run_message(user, "tell me a long story " * 5, until="run.limit_reached")
    assert run.status == Run.Status.LIMIT_REACHED and run.error_code == "run_timeout"

    trace = await Trace.objects.aget(run=run)
    assert trace.status == "error" and trace.error_type == "run_timeout"
    # The node is closed through on_chain_error(CancelledError), the LLM call is still
    # open at the end: both are errors of the timeout, like the run, never `cancelled`.
    tree = await database_sync_to_async(shape)(trace)
    assert tree == [
        "run:run:error",
        "  node:call_model:error",
        "    llm:agentsite-offline-demo:error",
    ]
    spans = [s async for s in Span.objects.filter(trace=trace)]
    assert {(s.error_type, s.error_message) for s in spans} == {("run_timeout", run.error_message)}
    root = next(s for s in spans if s.kind == "run")
    assert all(root.started_at <= s.started_at <= s.ended_at <= root.ended_at for s in spans)


async def test_a_run_stopped_at_the_step_limit_leaves_a_consistent_tree(make_user, settings):
    settings.AGENT_MAX_STEPS = 1
    user = await database_sync_to_async(make_user)()
    run, _, _ = await run_message(user, "What is 2 + 2?", until="run.limit_reached")
    assert run.status == Run.Status.LIMIT_REACHED and run.error_code == "max_steps"

    # A limit is not a failure of any step: the steps that ran are `ok`, and the run (root
    # span and trace alike) is `error` with the limit's code, as trace_status_for maps
    # limit_reached.
    trace = await Trace.objects.aget(run=run)
    assert (trace.status, trace.error_type, trace.error_message) == (
        "error",
        "max_steps",
        run.error_message,
    )
    tree = await database_sync_to_async(shape)(trace)
    assert tree == [
        "run:run:error",
        "  node:call_model:ok",
        "    llm:agentsite-offline-demo:ok",
        "  node:stop_at_step_limit:ok",
    ]
    root = await Span.objects.aget(trace=trace, kind="run")
    assert (root.error_type, root.error_message) == ("max_steps", run.error_message)
    assert trace.span_count == await Span.objects.filter(trace=trace).acount() == 4


async def test_the_run_logs_with_its_trace_and_root_span_ids(make_user, caplog):
    caplog.set_level(logging.INFO, logger="chat.agent")
    caplog.handler.addFilter(ContextFilter())
    user = await database_sync_to_async(make_user)()
    run, _, _ = await run_message(user, "What is 2*3?")
    root = await Span.objects.aget(trace_id=run.id, kind="run")
    # Before the graph starts and after it ends: run-level lines carry the root span,
    # with the ids the OTLP export gives the trace and the span, as OpenTelemetry
    # writes them.
    lines = {
        record.getMessage(): (record.run_id, record.trace_id, record.span_id)
        for record in caplog.records
        if record.name in ("chat.agent.runner", "chat.agent.finisher")
    }
    ids = (str(run.id), f"{run.id.int:032x}", f"{otel_span_id(root.id):016x}")
    assert lines[f"run {run.id} started"] == ids
    assert lines[f"run {run.id} finished: completed"] == ids
