"""Finishing a run, however it ended (an answer, a failure, a cancel, a limit): its
ledger closed, the run and its answer stored and its trace written in one transaction,
in one hop to the database thread; then its final event published."""

import asyncio
import logging
from dataclasses import dataclass
from uuid import UUID

from channels.db import database_sync_to_async
from django.db import transaction

from billing.budget import RunCost, Usage, budget_settle, usage_close_run
from chat import lifecycle
from chat.events import Event, RunEventStream
from chat.run_outcome import RunOutcome
from tracing.capture import RunTracer, trace_status_for

from .budget import RunBudget

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """`cost`: the run's calls by the ledger (None: not recorded). `closed_here`: this
    process closed the run (not another one, which found its lease lapsed). `deleted`:
    the run was deleted with its conversation while it ran."""

    cost: RunCost | None
    closed_here: bool
    deleted: bool = False


async def run_finish_and_publish(
    *,
    run_id: UUID,
    outcome: RunOutcome,
    stream: RunEventStream | None,
    tracer: RunTracer | None,
    budget: RunBudget | None,
    recoveries: int | None = None,
) -> Finished:
    """Record the run's end and publish its final event. `stream`: None if the run never
    started (nothing to publish to); `budget`: None if it never got as far as holding
    any; `recoveries`: the run's count when this execution started it (None: it never
    did), so that an execution whose run was recovered since leaves it be.

    Shielded: a late cancel must not lose the recorded outcome, its cost or the final
    event every open socket is waiting for; the finishing goes on and is waited for."""
    finishing = asyncio.ensure_future(_finish(run_id, outcome, stream, tracer, budget, recoveries))
    try:
        return await asyncio.shield(finishing)
    except asyncio.CancelledError:
        return await finishing


async def _finish(
    run_id: UUID,
    outcome: RunOutcome,
    stream: RunEventStream | None,
    tracer: RunTracer | None,
    budget: RunBudget | None,
    recoveries: int | None,
) -> Finished:
    traced = tracer is not None and await _trace_close(tracer, outcome)
    recorded = await database_sync_to_async(run_end_record)(
        run_id=run_id,
        outcome=outcome,
        final_seq=(stream.seq if stream else 0) + 1,
        budget=budget,
        tracer=tracer if traced else None,
        recoveries=recoveries,
    )
    if recorded.final is not None and stream is not None:
        logger.info("run %s finished: %s", run_id, outcome.status.value)
        await stream.publish(recorded.final)
    if recorded.traced:
        assert tracer is not None
        tracer.report()
    return Finished(
        cost=recorded.cost, closed_here=recorded.final is not None, deleted=recorded.deleted
    )


async def _trace_close(tracer: RunTracer, outcome: RunOutcome) -> bool:
    """A failure here loses the trace, never the answer."""
    try:
        await tracer.close(
            status=trace_status_for(outcome.status),
            error_type=outcome.error_code,
            error_message=outcome.error_message,
        )
    except Exception:
        logger.exception("run %s: could not write its trace", tracer.run_id)
        return False
    return True


@dataclass(frozen=True)
class RecordedEnd:
    final: Event | None
    cost: RunCost | None
    traced: bool
    deleted: bool


def run_end_record(
    *,
    run_id: UUID,
    outcome: RunOutcome,
    final_seq: int,
    budget: RunBudget | None,
    tracer: RunTracer | None,
    recoveries: int | None = None,
) -> RecordedEnd:
    """The run's end, in one transaction: the ledger first (the run's totals become the
    ledger's, so the footer, the run and the ledger agree), then the run and its answer
    (`lifecycle.run_finish`: its final event, None if another process closed it), then
    its trace, with the ledger's costs. The ledger and the trace each in a savepoint: a
    failure there is logged and loses the cost or the trace, never the answer. Nothing
    at all if another process recovered the run meanwhile (`recoveries`, see
    `lifecycle.run_lock`): its holds, its trace and its end are that execution's. The
    budget left, which the final event shows, is read after the commit: a read needs no
    savepoint there."""
    with transaction.atomic():
        # The run's row first, as a reaper closing it takes it before the ledger's.
        locked = lifecycle.run_lock(run_id=run_id, recoveries=recoveries)
        if locked is None:
            return RecordedEnd(final=None, cost=None, traced=False, deleted=False)
        cost = _usage_close(run_id, outcome, budget) if budget is not None else None
        finished = lifecycle.run_finish(locked=locked, outcome=outcome, final_seq=final_seq)
        # Not for a run another process closed (it closed the trace too), nor for one
        # deleted while it ran (its trace went with it, and refers to it).
        ours = finished is not None and finished.stored
        traced = tracer is not None and ours and _trace_store(tracer, cost)
    return RecordedEnd(
        final=finished.final_with_budget() if finished else None,
        cost=cost,
        traced=traced,
        deleted=finished is not None and not finished.stored,
    )


def _usage_close(run_id: UUID, outcome: RunOutcome, budget: RunBudget) -> RunCost | None:
    """Settle the run's calls still held into the ledger: its last call with its usage,
    calls cut short with what the run saw of them (`usage_close_run`)."""
    seen = Usage(
        input_tokens=outcome.input_tokens,
        output_tokens=outcome.output_tokens,
        cached_tokens=outcome.cached_tokens,
    )
    try:
        with transaction.atomic():
            if budget.unsettled is not None:
                budget_settle(reservation=budget.unsettled[0], usage=budget.unsettled[1])
            cost = usage_close_run(run_id=run_id, seen=seen)
    except Exception:
        logger.exception("run %s: could not record its usage", run_id)
        return None
    outcome.input_tokens = cost.input_tokens
    outcome.output_tokens = cost.output_tokens
    outcome.cached_tokens = cost.cached_tokens
    outcome.cost_usd = cost.total_usd
    return cost


def _trace_store(tracer: RunTracer, cost: RunCost | None) -> bool:
    try:
        with transaction.atomic():
            tracer.store(
                span_costs=cost.span_costs if cost else None,
                span_usage=cost.span_usage if cost else None,
                cost_usd=cost.total_usd if cost else None,
            )
    except Exception:
        logger.exception("run %s: could not write its trace", tracer.run_id)
        return False
    return True
