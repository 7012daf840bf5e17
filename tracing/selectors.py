"""Reads of traces. Ownership is enforced here, so every caller (pages, API, admin
helpers) gets the same answer about who may see what."""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, TypeVar
from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import ValidationError
from django.db.models import Model, QuerySet
from django.utils import timezone

from agentsite.auth import object_or_404, user_owned_or_404
from agentsite.errors import ApplicationError
from chat.models import Run

from .models import Span, Trace

# A run's trace row is written just after its last event, so a chat answer can link to
# a trace that does not exist yet. For this long after a run ends, a missing trace is
# taken to be on its way; after that, it is not coming.
TRACE_PENDING_GRACE = timedelta(seconds=60)

M = TypeVar("M", bound=Model)


@dataclass
class SpanNode:
    span: Span
    children: list["SpanNode"] = field(default_factory=list)
    depth: int = 0
    # Milliseconds from the trace start to this span's start: where its waterfall bar begins.
    offset_ms: float = 0.0


@dataclass(frozen=True)
class TraceAbsence:
    """Why a run the user may see has no trace."""

    run: Run
    # pending: still running or just finished (the trace is being written); disabled:
    # TRACING_ENABLED is off; absent: finished long ago and never traced.
    reason: Literal["pending", "disabled", "absent"]
    # Only for the conversation's owner: staff may see a run, not its conversation.
    conversation_id: UUID | None


def trace_list(
    *,
    user: AbstractBaseUser | AnonymousUser,
    status: str | None = None,
    model: str | None = None,
    started_after: datetime | None = None,
    started_before: datetime | None = None,
    min_duration_ms: float | None = None,
    min_cost_usd: Decimal | float | None = None,
) -> QuerySet[Trace]:
    """The traces `user` may see, newest first: their own, or everyone's for staff."""
    traces = Trace.objects.select_related("user")
    if not user.is_authenticated:
        return traces.none()
    if not getattr(user, "is_staff", False):
        traces = traces.filter(user_id=user.pk)
    if status:
        traces = traces.filter(status=status)
    if model:
        traces = traces.filter(model=model)
    if started_after is not None:
        traces = traces.filter(started_at__gte=started_after)
    if started_before is not None:
        traces = traces.filter(started_at__lt=started_before)
    if min_duration_ms is not None:
        traces = traces.filter(duration_ms__gte=min_duration_ms)
    if min_cost_usd is not None:
        traces = traces.filter(cost_usd__gte=min_cost_usd)
    return traces.order_by("-started_at")


def trace_get(*, user: AbstractBaseUser | AnonymousUser, run_id: UUID | str) -> Trace:
    """The trace of a run, if `user` may see it. Another user's trace is reported as
    not found (not forbidden), so run ids cannot be probed for existence."""
    traces = Trace.objects.select_related("user", "run")
    return _visible_or_404(traces, user=user, owner_field="user", run_id=run_id)


def trace_absence(*, user: AbstractBaseUser | AnonymousUser, run_id: UUID | str) -> TraceAbsence:
    """Why a run has no trace `user` may see, for a trace link followed before (or
    without) its trace. A run `user` may not see is not found, exactly like its trace,
    so run ids cannot be probed."""
    runs = Run.objects.select_related("conversation")
    run = _visible_or_404(runs, user=user, owner_field="conversation__owner", id=run_id)
    owner_id = run.conversation.owner_id
    reason: Literal["pending", "disabled", "absent"]
    if not settings.TRACING_ENABLED:
        reason = "disabled"
    elif run.finished_at is None or timezone.now() - run.finished_at < TRACE_PENDING_GRACE:
        reason = "pending"
    else:
        # Finished long ago and never traced (before tracing existed, or a failed write).
        reason = "absent"
    return TraceAbsence(
        run=run,
        reason=reason,
        conversation_id=run.conversation_id if owner_id == user.pk else None,
    )


def span_get(*, trace: Trace, span_id: UUID | str) -> Span:
    """One span of a trace the caller has already been allowed to see (`trace_get`)."""
    try:
        return Span.objects.get(trace=trace, id=span_id)
    except (Span.DoesNotExist, ValidationError, ValueError) as error:
        raise ApplicationError("not_found", "There is no such span.", http_status=404) from error


def trace_tree(*, trace: Trace, with_attributes: bool = True) -> list[SpanNode]:
    """The trace's spans as a forest (normally one root: the run), children in start
    order. One query; the tree is assembled in Python. Without attributes (prompts and
    completions: tens of KB per LLM span) when the caller only draws the tree."""
    spans_qs = Span.objects.filter(trace=trace).order_by("started_at", "id")
    if not with_attributes:
        spans_qs = spans_qs.defer("attributes")
    spans = list(spans_qs)
    origin = trace.started_at
    nodes = {
        span.id: SpanNode(span=span, offset_ms=(span.started_at - origin).total_seconds() * 1000)
        for span in spans
    }
    roots: list[SpanNode] = []
    for span in spans:
        node = nodes[span.id]
        parent = nodes.get(span.parent_id) if span.parent_id else None
        # A span whose parent is missing (should not happen) is shown at the top level
        # rather than silently dropped.
        (parent.children if parent is not None else roots).append(node)
    stack = [(root, 0) for root in roots]
    while stack:
        node, depth = stack.pop()
        node.depth = depth
        stack.extend((child, depth + 1) for child in node.children)
    return roots


def trace_flatten(*, roots: list[SpanNode]) -> list[SpanNode]:
    """The tree in display order (depth first, children in start order)."""
    flat: list[SpanNode] = []
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        flat.append(node)
        stack.extend(reversed(node.children))
    return flat


def _visible_or_404(
    queryset: QuerySet[M],
    *,
    user: AbstractBaseUser | AnonymousUser,
    owner_field: str,
    **lookup: Any,
) -> M:
    """For the browsing pages: the owner sees their own, as everywhere (agentsite.auth's
    one policy, whose 404 this is); staff see everyone's, since operators debug other
    users' runs here. The JSON API never comes here: tracing.api looks traces up with
    `owned_or_404`, so a key, even a staff user's, carries no operator's view."""
    if getattr(user, "is_staff", False):
        return object_or_404(queryset, name="trace", **lookup)
    return user_owned_or_404(
        queryset, user_id=user.pk, name="trace", owner_field=owner_field, **lookup
    )
