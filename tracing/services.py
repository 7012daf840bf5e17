"""Writes of traces. The capture buffers spans and hands them over here in batches."""

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Protocol
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from .models import Span, Trace

PRUNE_BATCH = 500

# What the ledger decides about a stored span.
LEDGER_FIELDS = ["cost_usd", "input_tokens", "output_tokens", "cached_tokens"]


class CallUsage(Protocol):
    """The tokens the ledger recorded for one LLM call (billing's `Usage` is one)."""

    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...


def trace_start(*, run_id: UUID, user_id: int, model: str, started_at: datetime) -> Trace:
    # A plain insert: a run is executed once (run_start moves it out of `queued` only
    # once), and its tracer writes this row at most once, either here or in trace_finish.
    return Trace.objects.create(
        run_id=run_id,
        user_id=user_id,
        model=model,
        started_at=started_at,
        status=Trace.Status.RUNNING,
    )


INTERRUPTED_SPAN = "interrupted"


def trace_resume(
    *, run_id: UUID, user_id: int, model: str, started_at: datetime, recoveries: int
) -> tuple[Trace, list[Span]]:
    """Continue the trace of a run resumed after the process executing it stopped (see
    `RunTracer.resume`): its row (written now if that process died before writing it),
    running again, and a span named "interrupted" that covers the gap, from the last
    span that process wrote (or the run's start) to now, with the `recoveries` count.
    Returns the row and every span stored (the gap's included)."""
    now = timezone.now()
    with transaction.atomic():
        trace, _ = Trace.objects.select_for_update().get_or_create(
            run_id=run_id, defaults={"user_id": user_id, "model": model, "started_at": started_at}
        )
        if trace.status != Trace.Status.RUNNING:
            trace.status = Trace.Status.RUNNING
            trace.save(update_fields=["status"])
        stored = list(Span.objects.filter(trace_id=run_id))
        since = max((span.ended_at for span in stored), default=trace.started_at)
        gap = Span(
            id=uuid.uuid4(),
            trace_id=run_id,
            parent_id=run_id,  # the root span's id is the run's
            kind=Span.Kind.NODE,
            name=INTERRUPTED_SPAN,
            status=Span.Status.ERROR,
            started_at=since,
            ended_at=now,
            duration_ms=max((now - since).total_seconds() * 1000, 0.0),
            error_type="run_interrupted",
            error_message="The process executing the run stopped; the run was resumed from "
            "its last checkpoint, and what the step it was in had done was lost.",
            attributes={"recoveries": recoveries},
        )
        gap.save(force_insert=True)
    return trace, [*stored, gap]


def trace_close_interrupted(
    *,
    run_id: UUID,
    user_id: int,
    model: str,
    started_at: datetime,
    error_type: str,
    error_message: str,
    status: str = Trace.Status.ERROR,
    span_costs: Mapping[UUID, Decimal | None] | None = None,
    span_usage: Mapping[UUID, CallUsage] | None = None,
    cost_usd: Decimal | None = None,
) -> bool:
    """Close the trace of a run whose process died: its tracer will never finish it.
    What the tracer wrote before it died (it flushes on every lease renewal) stays, under
    a root span written here, and the totals are those spans'. A run that died before
    its trace row was written gets one. `span_costs`, `span_usage` and `cost_usd`: what
    the ledger settled, applied as a finishing tracer applies them (`span_ledger_apply`),
    so an interrupted trace's tokens are the ledger's too. False if it was closed
    already (its tracer finished it after all)."""
    now = timezone.now()
    with transaction.atomic():
        trace, _ = Trace.objects.select_for_update().get_or_create(
            run_id=run_id, defaults={"user_id": user_id, "model": model, "started_at": started_at}
        )
        if trace.status != Trace.Status.RUNNING:
            return False
        duration_ms = (now - trace.started_at).total_seconds() * 1000
        stored = list(Span.objects.filter(trace_id=run_id).defer("attributes"))
        corrected = span_ledger_apply(
            spans=stored, span_costs=span_costs or {}, span_usage=span_usage or {}
        )
        root = []
        if not any(span.id == run_id for span in stored):
            root.append(
                Span(
                    id=run_id,
                    trace_id=run_id,
                    kind=Span.Kind.RUN,
                    name="run",
                    status=status,
                    started_at=trace.started_at,
                    ended_at=now,
                    duration_ms=duration_ms,
                    error_type=error_type[:200],
                    error_message=error_message,
                    attributes={"model": model} if model else {},
                )
            )
        # The same write as a finishing tracer's, with the totals of what is stored.
        trace_finish(
            run_id=run_id,
            spans=root,
            corrected_spans=corrected,
            status=status,
            ended_at=now,
            duration_ms=duration_ms,
            all_spans=stored + root,
            error_type=error_type,
            error_message=error_message,
            cost_usd=cost_usd,
        )
    return True


def span_ledger_apply(
    *,
    spans: Sequence[Span],
    span_costs: Mapping[UUID, Decimal | None],
    span_usage: Mapping[UUID, CallUsage],
) -> list[Span]:
    """Give each LLM span its call's cost and tokens from the ledger (in memory); returns
    the spans changed, to write (`LEDGER_FIELDS`). The ledger is the one truth about a
    call's tokens: a call cut short reports no usage to the callbacks, yet is billed for
    what it streamed."""
    changed = []
    for span in spans:
        if span.id in span_costs:
            span.cost_usd = span_costs[span.id]
        counts = span_usage.get(span.id)
        if counts is not None:
            span.input_tokens = counts.input_tokens
            span.output_tokens = counts.output_tokens
            span.cached_tokens = counts.cached_tokens
        if span.id in span_costs or counts is not None:
            changed.append(span)
    return changed


def span_bulk_create(*, spans: Sequence[Span]) -> None:
    Span.objects.bulk_create(spans, batch_size=500)


def trace_finish(
    *,
    run_id: UUID,
    spans: Sequence[Span],
    corrected_spans: Sequence[Span] = (),
    status: str,
    create: bool = False,
    user_id: int | None = None,
    model: str = "",
    started_at: datetime | None = None,
    ended_at: datetime,
    duration_ms: float,
    all_spans: Sequence[Span],
    error_type: str = "",
    error_message: str = "",
    cost_usd: Decimal | None = None,
) -> None:
    """Write the last spans and the trace's totals together, so a finished trace is
    never seen with half its spans. `create`: the trace row was not written at the start
    (a short run), so it is written here, in the same transaction. `corrected_spans`:
    spans written in an earlier batch whose cost and tokens the ledger has since given.
    `all_spans`: every span of the trace, the new ones included, for its totals."""
    totals = {
        "status": status,
        "ended_at": ended_at,
        "duration_ms": duration_ms,
        "span_count": len(all_spans),
        "input_tokens": sum(span.input_tokens for span in all_spans),
        "output_tokens": sum(span.output_tokens for span in all_spans),
        "cached_tokens": sum(span.cached_tokens for span in all_spans),
        "cost_usd": cost_usd,
        "error_type": error_type[:200],
        "error_message": error_message,
    }
    # No savepoint of its own where a caller's transaction holds it (a run's finish).
    with transaction.atomic(savepoint=False):
        if create:
            assert user_id is not None and started_at is not None
            Trace.objects.create(
                run_id=run_id, user_id=user_id, model=model, started_at=started_at, **totals
            )
        elif not Trace.objects.filter(run_id=run_id, status=Trace.Status.RUNNING).update(**totals):
            return  # closed meanwhile as interrupted (its process stalled past its lease)
        span_bulk_create(spans=spans)
        if corrected_spans:
            Span.objects.bulk_update(corrected_spans, LEDGER_FIELDS)


def trace_prune(*, older_than_days: int, batch_size: int = PRUNE_BATCH) -> int:
    """Delete traces (and their spans) that started more than `older_than_days` ago,
    a batch at a time so a large backlog never holds one long lock. Returns how many."""
    cutoff = timezone.now() - timedelta(days=older_than_days)
    deleted = 0
    while True:
        ids = list(
            Trace.objects.filter(started_at__lt=cutoff).values_list("run_id", flat=True)[
                :batch_size
            ]
        )
        if not ids:
            return deleted
        with transaction.atomic():
            # Spans first, in one plain DELETE: `parent` is DO_NOTHING (no database
            # constraint either), so Django need not load the trees to cascade.
            Span.objects.filter(trace_id__in=ids).delete()
            Trace.objects.filter(run_id__in=ids).delete()
        deleted += len(ids)
