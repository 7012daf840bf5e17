"""Reads of traces. Ownership is enforced here, so every caller (pages, API, admin
helpers) gets the same answer about who may see what."""

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from agentsite.errors import ApplicationError

from .models import Span, Trace


@dataclass
class SpanNode:
    span: Span
    children: list["SpanNode"] = field(default_factory=list)
    depth: int = 0
    # Milliseconds from the trace start to this span's start: where its waterfall bar begins.
    offset_ms: float = 0.0


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


def trace_get(
    *, user: AbstractBaseUser | AnonymousUser, run_id: UUID | str, allow_staff: bool = True
) -> Trace:
    """The trace of a run, if `user` may see it. Another user's trace is reported as
    not found (not forbidden), so run ids cannot be probed for existence."""
    not_found = ApplicationError("not_found", "There is no such trace.", http_status=404)
    if not user.is_authenticated:
        raise not_found
    try:
        trace = Trace.objects.select_related("user").get(run_id=run_id)
    except (Trace.DoesNotExist, ValidationError, ValueError) as error:
        raise not_found from error
    if trace.user_id != user.pk and not (allow_staff and getattr(user, "is_staff", False)):
        raise not_found
    return trace


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
