"""Executing one run: drive the graph, stream its events, record the outcome.

Whatever happens (an answer, a provider failure, a cancel, a limit), the run ends with
its status, its partial output and its token usage recorded, and with one final event.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast
from uuid import UUID

from channels.db import database_sync_to_async
from django.conf import settings
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage

from agentsite import metrics
from agentsite.logging import run_id_var
from billing.budget import BudgetExceeded, RunCost, Usage, usage_close_run
from billing.services import account_for_user
from chat import lifecycle
from chat.events import RunEventStream
from chat.metrics import run_end_observe, tool_call_observe
from chat.models import Run
from chat.run_outcome import RunOutcome
from tracing.capture import RunTracer, trace_status_for

from .budget import RunBudget, usage_of
from .checkpointer import CHECKPOINT_DURABILITY, checkpointer
from .context import Context
from .errors import provider_error_from
from .graph import build_graph
from .models import model_info
from .replies import rejected_arguments
from .state import State

logger = logging.getLogger(__name__)


async def execute_run(run_id: UUID) -> None:
    outcome = RunOutcome()
    stream: RunEventStream | None = None
    tracer: RunTracer | None = None
    started: float | None = None
    user_id: int | None = None
    cost: RunCost | None = None
    deadline = asyncio.timeout(settings.AGENT_RUN_TIMEOUT)
    run_id_var.set(str(run_id))
    try:
        run = await database_sync_to_async(lifecycle.run_start)(run_id=run_id)
        if run is None:
            return
        started = time.monotonic()
        user_id = run.conversation.owner_id
        metrics.ACTIVE_RUNS.inc()
        tracer = _start_trace(run)
        lifecycle.lease_keeper().attach(run_id, outcome=outcome, tracer=tracer)
        stream = RunEventStream(
            run.id, run.conversation_id, ceiling=run.event_seq, reserve=_seq_reserver(run_id)
        )
        user_message = await run.messages.filter(role="user").afirst()
        await stream.emit(
            "run.started",
            model=model_info().label,
            conversation_title=run.conversation.title,
            user_message=lifecycle.message_out(user_message.id, user_message.content)
            if user_message
            else None,
        )
        logger.info("run %s started", run_id)
        async with deadline:
            await _drive_graph(
                run, user_message.content if user_message else "", stream, outcome, tracer
            )
    except asyncio.CancelledError:
        outcome.fail(Run.Status.CANCELLED, "cancelled", "Stopped by the user.")
    except BudgetExceeded as error:
        outcome.fail(Run.Status.BUDGET_EXCEEDED, error.code, error.message)
    except TimeoutError as error:
        if deadline.expired():
            outcome.fail(
                Run.Status.LIMIT_REACHED,
                "run_timeout",
                f"The answer took longer than {settings.AGENT_RUN_TIMEOUT:g} seconds "
                "(AGENT_RUN_TIMEOUT) and was stopped.",
            )
        else:  # a provider's own timeout, not the run's deadline
            _fail_with(outcome, run_id, error)
    except Exception as error:
        _fail_with(outcome, run_id, error)
    # Shielded: a late cancel must not lose the recorded outcome, its cost or the final
    # event every open socket is waiting for; the finishing goes on and is waited for.
    finishing = asyncio.ensure_future(_finish(run_id, stream, outcome, user_id))
    closed_here = False
    try:
        cost, closed_here = await asyncio.shield(finishing)
    except asyncio.CancelledError:
        cost, closed_here = await finishing
    finally:
        if started is not None:  # the run really started
            metrics.ACTIVE_RUNS.dec()
            # A run another process closed (its lease lapsed) was counted, with its
            # recorded cause, by that process: the cancel seen here is not its ending.
            if closed_here:
                run_end_observe(status=outcome.status.value, error_code=outcome.error_code)
            metrics.RUN_DURATION.observe(time.monotonic() - started)
            if cost is not None:
                metrics.llm_cost_observe(model=model_info().name, costs=cost.span_costs.values())
        if tracer is not None:
            await _finish_trace(tracer, outcome, cost)


def _seq_reserver(run_id: UUID) -> Callable[[int], Awaitable[int]]:
    async def reserve(seq: int) -> int:
        return await database_sync_to_async(lifecycle.run_seq_reserve)(run_id=run_id, seq=seq)

    return reserve


def _start_trace(run: Run) -> RunTracer | None:
    if not settings.TRACING_ENABLED:
        return None
    info = model_info()
    tracer = RunTracer(
        run_id=run.id,
        user_id=run.conversation.owner_id,
        conversation_id=run.conversation_id,
        model=info.name,
        provider=info.provider,
    )
    tracer.start()
    return tracer


async def _finish_trace(tracer: RunTracer, outcome: RunOutcome, cost: RunCost | None) -> None:
    # After the final event: the user has the answer while the spans are written.
    # Shielded, so a late cancel cannot leave the trace half written. A failure here
    # loses the trace, never the answer.
    try:
        await asyncio.shield(
            tracer.finish(
                status=trace_status_for(outcome.status),
                error_type=outcome.error_code,
                error_message=outcome.error_message,
                span_costs=cost.span_costs if cost else None,
                span_usage=cost.span_usage if cost else None,
                cost_usd=cost.total_usd if cost else None,
            )
        )
    except Exception:
        logger.exception("run %s: could not write its trace", tracer.run_id)


def _fail_with(outcome: RunOutcome, run_id: UUID, error: Exception) -> None:
    provider_error = provider_error_from(error)
    if provider_error is not None:
        logger.warning("run %s: provider error %s", run_id, provider_error.code)
        outcome.fail(Run.Status.FAILED, provider_error.code, provider_error.message)
    else:
        logger.exception("run %s failed", run_id, exc_info=error)
        outcome.fail(
            Run.Status.FAILED,
            "internal_error",
            "Something went wrong on our side while answering; it has been logged.",
        )


async def _drive_graph(
    run: Run,
    content: str,
    stream: RunEventStream,
    outcome: RunOutcome,
    tracer: RunTracer | None = None,
) -> None:
    user_id = run.conversation.owner_id
    context = Context(
        run_id=run.id,
        conversation_id=run.conversation_id,
        user_id=user_id,
        max_steps=settings.AGENT_MAX_STEPS,
        context_tokens=settings.AGENT_CONTEXT_TOKENS,
    )
    account = await database_sync_to_async(account_for_user)(user_id=user_id)
    budget = RunBudget(
        account_id=account.pk,
        user_id=user_id,
        run_id=run.id,
        model=model_info().name,
        max_output_tokens=settings.AGENT_MAX_TOKENS,
        min_output_tokens=settings.AGENT_MIN_OUTPUT_TOKENS,
    )
    config: Any = {
        "configurable": {"thread_id": str(run.conversation_id)},
        # The step limit is enforced by the graph itself; this only guards against bugs.
        "recursion_limit": settings.AGENT_MAX_STEPS * 3 + 10,
        "callbacks": [tracer] if tracer is not None else [],
    }
    graph_input: State = {"messages": [HumanMessage(content=content)], "steps": 0}
    async with checkpointer() as saver:
        graph = build_graph(saver, budget=budget)
        parts = graph.astream(
            graph_input,
            config,
            context=context,
            stream_mode=["messages", "updates"],
            durability=CHECKPOINT_DURABILITY,
        )
        # With several stream modes LangGraph yields (mode, data) pairs.
        async for mode, data in cast(AsyncIterator[tuple[str, Any]], parts):
            if mode == "messages":
                await _on_message_chunk(*data, stream=stream, outcome=outcome)
            else:
                for node, update in data.items():
                    await _on_node_update(node, update or {}, stream, outcome)


async def _on_message_chunk(
    chunk: Any, metadata: dict[str, Any], *, stream: RunEventStream, outcome: RunOutcome
) -> None:
    if metadata.get("langgraph_node") == "call_model" and isinstance(chunk, AIMessageChunk):
        text = chunk.text
        if text:
            outcome.add_streamed_text(text)
            await stream.emit("token", text=text)


async def _on_node_update(
    node: str, update: dict[str, Any], stream: RunEventStream, outcome: RunOutcome
) -> None:
    messages = update.get("messages", [])
    if node == "call_model":
        outcome.steps = update.get("steps", outcome.steps)
        for message in messages:
            if isinstance(message, AIMessage):
                await _on_model_message(message, stream, outcome)
        return
    # A tool call's result: from the tools, or an error answering a call that never ran
    # (its arguments unusable, or the step limit reached): all shown alike.
    for message in messages:
        if isinstance(message, ToolMessage):
            is_error = message.status == "error"
            tool_call_observe(tool=message.name or "", is_error=is_error)
            outcome.add_tool_result(
                tool_call_id=message.tool_call_id, result=message.text, is_error=is_error
            )
            await stream.emit(
                "tool.finished",
                tool_call_id=message.tool_call_id,
                name=message.name,
                result=message.text,
                is_error=is_error,
            )
    if node == "stop_at_step_limit":
        explanation = next(m for m in messages if isinstance(m, AIMessage))
        outcome.add_text(explanation.text)
        await stream.emit("token", text=explanation.text)
        outcome.fail(Run.Status.LIMIT_REACHED, "max_steps", explanation.text)


async def _on_model_message(
    message: AIMessage, stream: RunEventStream, outcome: RunOutcome
) -> None:
    if message.usage_metadata:
        usage = usage_of(message)
        outcome.add_usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_tokens,
        )
        await stream.emit(
            "usage",
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.input_tokens + usage.output_tokens,
        )
    for call in message.tool_calls:
        outcome.add_tool_call(tool_call_id=call["id"] or "", name=call["name"], args=call["args"])
        await stream.emit(
            "tool.started", tool_call_id=call["id"], name=call["name"], args=call["args"]
        )
    # Calls whose arguments were unusable are shown too, with the arguments as sent (a
    # string): the user sees what the model tried and, when it finishes, why it never ran.
    for invalid in message.invalid_tool_calls:
        raw = rejected_arguments(message, invalid)
        name = invalid.get("name") or ""
        outcome.add_tool_call(tool_call_id=invalid.get("id") or "", name=name, args=raw)
        await stream.emit("tool.started", tool_call_id=invalid.get("id"), name=name, args=raw)


async def _finish(
    run_id: UUID,
    stream: RunEventStream | None,
    outcome: RunOutcome,
    user_id: int | None,
) -> tuple[RunCost | None, bool]:
    """Record the run's end; returns its cost and whether this process closed it."""
    # The ledger first: the run's totals become the ledger's, so the footer, the run
    # and the ledger agree.
    cost = await _close_usage(run_id, outcome) if user_id is not None else None
    final = await database_sync_to_async(lifecycle.run_finish)(
        run_id=run_id, outcome=outcome, final_seq=(stream.seq if stream else 0) + 1
    )
    if final is None:  # closed by another process
        return cost, False
    if stream is None:  # not started
        return cost, True
    logger.info("run %s finished: %s", run_id, outcome.status.value)
    await stream.publish(final)
    return cost, True


async def _close_usage(run_id: UUID, outcome: RunOutcome) -> RunCost | None:
    """Settle the run's calls still held into the ledger before the final event, which
    shows the cost. A failure here is logged and loses the cost, never the answer."""
    seen = Usage(
        input_tokens=outcome.input_tokens,
        output_tokens=outcome.output_tokens,
        cached_tokens=outcome.cached_tokens,
    )
    try:
        cost = await database_sync_to_async(usage_close_run)(run_id=run_id, seen=seen)
    except Exception:
        logger.exception("run %s: could not record its usage", run_id)
        return None
    outcome.input_tokens = cost.input_tokens
    outcome.output_tokens = cost.output_tokens
    outcome.cached_tokens = cost.cached_tokens
    outcome.cost_usd = cost.total_usd
    return cost
