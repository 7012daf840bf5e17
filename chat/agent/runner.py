"""Executing one run: start it, drive its graph, finish it.

Whatever happens (an answer, a provider failure, a cancel, a limit), the run ends with
its status, its partial output and its token usage recorded, and with one final event.
The graph's stream is translated once into the run's steps (`translator`), from which
both its events and its stored outcome derive; the finishing is `finisher`'s.

A run recovered after its process died (or handed it back, see `chat.lifecycle`) is
resumed: from the thread's latest checkpoint if that is its own (every checkpoint
carries the run's id in its metadata), its output so far rebuilt from the checkpointed
messages; else from its input, afresh. A run handed back stops without finishing.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast
from uuid import UUID

from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage

from agentsite import metrics
from agentsite.logging import run_id_var
from billing.budget import BudgetExceeded
from chat import lifecycle
from chat.events import RunEventStream
from chat.metrics import run_end_observe, tool_call_observe
from chat.models import Message, Run
from chat.run_outcome import RunOutcome, StepsCounted, ToolFinished
from tracing.capture import RunTracer

from .budget import RunBudget
from .checkpointer import CHECKPOINT_DURABILITY, checkpointer, forget_thread
from .context import Context
from .errors import provider_error_from
from .finisher import run_finish_and_publish
from .graph import AgentGraph, agent_graph
from .models import model_info
from .state import State
from .translator import STREAM_MODES, event_of, steps_of_messages, translate

logger = logging.getLogger(__name__)


async def execute_run(run_id: UUID, prestarted: lifecycle.StartedRun | None = None) -> None:
    """Execute a queued run (started here), or one created started (`prestarted`)."""
    outcome = RunOutcome()
    stream: RunEventStream | None = None
    tracer: RunTracer | None = None
    started: float | None = None
    context: Context | None = None
    start: lifecycle.StartedRun | None = None
    handed_back = False
    deadline: asyncio.Timeout | None = None
    run_id_var.set(str(run_id))
    keeper = lifecycle.lease_keeper()
    try:
        start = prestarted or await database_sync_to_async(lifecycle.run_start)(run_id=run_id)
        if start is None:
            return
        started = time.monotonic()
        metrics.ACTIVE_RUNS.inc()
        run = start.run
        if start.resumed:
            # The ledger's totals (`run_recover` settled the cut call): each call is
            # billed once, the cut one for what it streamed, its re-run in full.
            outcome.input_tokens, outcome.output_tokens = run.input_tokens, run.output_tokens
        context = _context(run, account_id=start.account_id)
        tracer = _start_trace(run, resumed=start.resumed)
        keeper.attach(run_id, outcome=outcome, tracer=tracer)
        stream = RunEventStream(
            run.id,
            run.conversation_id,
            seq=start.seq,
            ceiling=run.event_seq,
            reserve=_seq_reserver(run_id),
        )
        if start.resumed:
            # Its first event, past any seq its earlier execution may have used: its
            # followers drop the partial output of the step that was cut.
            await stream.emit("run.resumed", recoveries=run.recoveries)
            logger.info("run %s resumed (recovery %d)", run_id, run.recoveries)
        else:
            message = start.user_message
            await stream.emit(
                "run.started",
                model=model_info().label,
                conversation_title=run.conversation.title,
                user_message=lifecycle.message_out(message.id, message.content)
                if message
                else None,
            )
            logger.info("run %s started", run_id)
        deadline = _deadline(run)
        await _drive_graph(context, start, stream, outcome, tracer, deadline)
    except asyncio.CancelledError:
        handed_back = keeper.handed_back(run_id)
        outcome.fail(Run.Status.CANCELLED, "cancelled", "Stopped by the user.")
    except BudgetExceeded as error:
        outcome.fail(Run.Status.BUDGET_EXCEEDED, error.code, error.message)
    except TimeoutError as error:
        if deadline is not None and deadline.expired():
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
    finished = None
    try:
        if handed_back:
            # Not finished: the process that resumes it does (no final event, no ledger
            # close); what it did so far is kept for that one.
            await _suspend(run_id, stream, tracer)
            return
        finished = await run_finish_and_publish(
            run_id=run_id,
            outcome=outcome,
            stream=stream,
            tracer=tracer,
            budget=context.budget if context is not None else None,
            recoveries=start.run.recoveries if start is not None else None,
        )
        if finished.deleted and context is not None:
            # Its conversation was deleted mid-run, and with it the agent's memory; the
            # graph may have written a checkpoint since (as it was cancelled), which
            # would outlive the conversation: forget it again, now the graph is done.
            await forget_thread(str(context.conversation_id))
    finally:
        if started is not None:  # the run really started
            metrics.ACTIVE_RUNS.dec()
            # A run another process closed (its lease lapsed) was counted, with its
            # recorded cause, by that process: the cancel seen here is not its ending.
            if finished is not None and finished.closed_here:
                run_end_observe(status=outcome.status.value, error_code=outcome.error_code)
            metrics.RUN_DURATION.observe(time.monotonic() - started)
            if finished is not None and finished.cost is not None:
                metrics.llm_cost_observe(
                    model=model_info().name, costs=finished.cost.span_costs.values()
                )


def _deadline(run: Run) -> asyncio.Timeout:
    """AGENT_RUN_TIMEOUT from the run's first start (`started_at`, kept when it is
    recovered), not from this execution's: a run whose process keeps dying gets no more
    time in all, and one resumed past it ends at once."""
    assert run.started_at is not None
    elapsed = (timezone.now() - run.started_at).total_seconds()
    loop = asyncio.get_running_loop()
    return asyncio.timeout_at(loop.time() + settings.AGENT_RUN_TIMEOUT - elapsed)


def _seq_reserver(run_id: UUID) -> Callable[[int], Awaitable[int]]:
    async def reserve(seq: int) -> int:
        return await database_sync_to_async(lifecycle.run_seq_reserve)(run_id=run_id, seq=seq)

    return reserve


async def _suspend(run_id: UUID, stream: RunEventStream | None, tracer: RunTracer | None) -> None:
    """A run handed back stops here: what it emitted is published, its finished spans
    written (shielded, as a finish is: a second cancel must not lose them)."""
    logger.info("run %s handed back", run_id)
    if stream is not None:
        await stream.flush()
    if tracer is not None:
        await asyncio.shield(tracer.suspend())


def _start_trace(run: Run, *, resumed: bool) -> RunTracer | None:
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
    if resumed:
        # The same trace, spans flushed before the interruption and all.
        assert run.started_at is not None
        tracer.resume(started_at=run.started_at, recoveries=run.recoveries)
    tracer.start()
    return tracer


def _context(run: Run, *, account_id: int) -> Context:
    user_id = run.conversation.owner_id
    return Context(
        run_id=run.id,
        conversation_id=run.conversation_id,
        user_id=user_id,
        max_steps=settings.AGENT_MAX_STEPS,
        context_tokens=settings.AGENT_CONTEXT_TOKENS,
        budget=RunBudget(
            account_id=account_id,
            user_id=user_id,
            run_id=run.id,
            api_key_id=run.api_key_id,
            api_key_prefix=run.api_key.prefix if run.api_key is not None else "",
            model=model_info().name,
            max_output_tokens=settings.AGENT_MAX_TOKENS,
            min_output_tokens=settings.AGENT_MIN_OUTPUT_TOKENS,
        ),
    )


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


def _input_message_id(run_id: UUID) -> str:
    """The id of the run's message in its conversation's checkpointed messages: where the
    run's own messages start."""
    return f"run-{run_id}"


def _graph_input(start: lifecycle.StartedRun) -> State:
    """What the run adds to its conversation's memory: the user's message, after any
    earlier turns the caller brought (the agent has not seen them), and the caller's
    instructions: always set, empty when the run brings none, since the graph's state
    outlives the run (its checkpoint) and one client's instructions must not reach a
    later run's model (a browser message, another request)."""
    turns: list[AnyMessage] = [
        HumanMessage(content=m.content)
        if m.role == Message.Role.USER
        else AIMessage(content=m.content)
        for m in start.history
    ]
    message = start.user_message
    asked = HumanMessage(
        content=message.content if message else "", id=_input_message_id(start.run.id)
    )
    return {
        "messages": [*turns, asked],
        "steps": 0,
        "instructions": start.run.instructions,
    }


async def _resumed_input(
    graph: AgentGraph,
    config: Any,
    start: lifecycle.StartedRun,
    outcome: RunOutcome,
) -> State | None:
    """The graph input of a resumed run. None (LangGraph continues from the latest
    checkpoint, and never runs a completed node again) if that checkpoint is the run's
    own, and then the run's output so far rebuilt from its messages there, so that the
    answer it stores is whole; else (it died before its first checkpoint) its input,
    afresh."""
    run_id = start.run.id
    snapshot = await graph.aget_state(config)
    if (snapshot.metadata or {}).get("run_id") != str(run_id):
        logger.info("run %s: no checkpoint of its own; starting it afresh", run_id)
        return _graph_input(start)
    outcome.restore(
        [
            *steps_of_messages(_messages_of_run(snapshot.values.get("messages", []), run_id)),
            StepsCounted(snapshot.values.get("steps", 0)),
        ]
    )
    logger.info("run %s: resuming from its checkpoint (next: %s)", run_id, list(snapshot.next))
    return None


def _messages_of_run(messages: list[BaseMessage], run_id: UUID) -> list[BaseMessage]:
    """The messages after the run's own input message: what the run produced."""
    mark = _input_message_id(run_id)
    for index, message in enumerate(messages):
        if message.id == mark:
            return messages[index + 1 :]
    return []


async def _drive_graph(
    context: Context,
    start: lifecycle.StartedRun,
    stream: RunEventStream,
    outcome: RunOutcome,
    tracer: RunTracer | None,
    deadline: asyncio.Timeout,
) -> None:
    config: Any = {
        "configurable": {"thread_id": str(context.conversation_id)},
        # Checkpoint metadata is taken from here: every checkpoint names the run that
        # wrote it, so a resumed run knows whether the latest one is its own.
        "metadata": {"run_id": str(start.run.id)},
        # The step limit is enforced by the graph itself; this only guards against bugs.
        "recursion_limit": settings.AGENT_MAX_STEPS * 3 + 10,
        "callbacks": [tracer] if tracer is not None else [],
    }
    async with checkpointer() as saver:
        graph = agent_graph(saver)
        graph_input = (
            await _resumed_input(graph, config, start, outcome)
            if start.resumed
            else _graph_input(start)
        )
        # The deadline from here, after the checkpoint's read: a run resumed past it
        # keeps its output so far (restored above), as a run that times out keeps its.
        async with deadline:
            parts = graph.astream(
                graph_input,
                config,
                context=context,
                stream_mode=STREAM_MODES,
                durability=CHECKPOINT_DURABILITY,
            )
            async for mode, data in cast(AsyncIterator[tuple[str, Any]], parts):
                for step in translate(mode, data):
                    outcome.record(step)
                    if isinstance(step, ToolFinished):
                        tool_call_observe(tool=step.name, is_error=step.is_error)
                    event = event_of(step)
                    if event is not None:
                        await stream.emit(event[0], **event[1])
