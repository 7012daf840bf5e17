"""Writes of traces. The capture buffers spans and hands them over here in batches."""

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from uuid import UUID

from django.db import transaction
from django.db.models import Count, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from .models import Span, Trace

PRUNE_BATCH = 500


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
    cost_usd: Decimal | None = None,
) -> None:
    """Close the trace of a run whose process died: its tracer will never finish it.
    What the tracer wrote before it died (it flushes on every lease renewal) stays, under
    a root span written here, and the totals are those spans'. A run that died before
    its trace row was written gets one. `span_costs` / `cost_usd`: what billing settled."""
    now = timezone.now()
    with transaction.atomic():
        trace, _ = Trace.objects.select_for_update().get_or_create(
            run_id=run_id, defaults={"user_id": user_id, "model": model, "started_at": started_at}
        )
        if trace.status != Trace.Status.RUNNING:
            return
        for span_id, cost in (span_costs or {}).items():
            if cost is not None:
                Span.objects.filter(id=span_id, trace_id=run_id).update(cost_usd=cost)
        Span.objects.get_or_create(
            id=run_id,
            defaults={
                "trace_id": run_id,
                "kind": Span.Kind.RUN,
                "name": "run",
                "status": status,
                "started_at": trace.started_at,
                "ended_at": now,
                "duration_ms": (now - trace.started_at).total_seconds() * 1000,
                "error_type": error_type[:200],
                "error_message": error_message,
                "attributes": {"model": model} if model else {},
            },
        )
        spans = Span.objects.filter(trace_id=run_id).aggregate(
            count=Count("id"),
            input=Coalesce(Sum("input_tokens"), 0),
            output=Coalesce(Sum("output_tokens"), 0),
            cached=Coalesce(Sum("cached_tokens"), 0),
        )
        Trace.objects.filter(run_id=run_id).update(
            status=status,
            ended_at=now,
            duration_ms=(now - trace.started_at).total_seconds() * 1000,
            span_count=spans["count"],
            input_tokens=spans["input"],
            output_tokens=spans["output"],
            cached_tokens=spans["cached"],
            cost_usd=cost_usd,
            error_type=error_type[:200],
            error_message=error_message,
        )


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
    span_count: int,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int,
    error_type: str = "",
    error_message: str = "",
    cost_usd: Decimal | None = None,
) -> None:
    """Write the last spans and the trace's totals together, so a finished trace is
    never seen with half its spans. `create`: the trace row was not written at the start
    (a short run), so it is written here, in the same transaction. `corrected_spans`:
    spans written in an earlier batch whose cost and tokens the ledger has since given."""
    totals = {
        "status": status,
        "ended_at": ended_at,
        "duration_ms": duration_ms,
        "span_count": span_count,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_tokens": cached_tokens,
        "cost_usd": cost_usd,
        "error_type": error_type[:200],
        "error_message": error_message,
    }
    with transaction.atomic():
        if create:
            assert user_id is not None and started_at is not None
            Trace.objects.create(
                run_id=run_id, user_id=user_id, model=model, started_at=started_at, **totals
            )
        elif not Trace.objects.filter(run_id=run_id, status=Trace.Status.RUNNING).update(**totals):
            return  # closed meanwhile as interrupted (its process stalled past its lease)
        span_bulk_create(spans=spans)
        if corrected_spans:
            Span.objects.bulk_update(
                corrected_spans, ["cost_usd", "input_tokens", "output_tokens", "cached_tokens"]
            )


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
