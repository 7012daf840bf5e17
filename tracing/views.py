"""The trace pages: a filterable list of traces, one trace as a tree and a waterfall, and
the details of one span (fetched when it is selected). Thin: validate, call a selector,
shape rows for the template."""

from typing import Any
from uuid import UUID

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from agentsite.errors import ApplicationError
from agentsite.formatting import format_usd
from agentsite.http import AuthenticatedHttpRequest

from . import selectors
from .formatting import format_compact, format_duration, format_payload
from .forms import TraceFilterForm
from .models import Span, Trace

TRACES_PER_PAGE = 50

# Attribute keys shown as a span's inputs and outputs (as capture writes them: an LLM
# call's prompt and completion, a tool's arguments and result); whatever else a span
# carries is shown below them, so nothing captured is hidden from the person.
INPUT_KEYS = ("prompt", "arguments")
OUTPUT_KEYS = ("completion", "result")
# A scalar attribute longer than this reads better as a block than in the facts table.
SHORT_VALUE_CHARS = 80
# How often the page of a trace still being written reloads itself.
PENDING_REFRESH_SECONDS = 1


@login_required
def trace_list_view(request: AuthenticatedHttpRequest) -> HttpResponse:
    form = TraceFilterForm(request.GET)
    page = None
    if form.is_valid():
        traces = selectors.trace_list(user=request.user, **form.selector_kwargs())
        page = Paginator(traces, TRACES_PER_PAGE).get_page(request.GET.get("page"))
    known_models = (
        selectors.trace_list(user=request.user)
        .exclude(model="")
        .order_by("model")
        .values_list("model", flat=True)
        .distinct()[:100]
    )
    return render(
        request,
        "tracing/trace_list.html",
        {
            "form": form,
            "page": page,
            "known_models": known_models,
            "show_user": request.user.is_staff,
        },
    )


@login_required
@require_GET
def trace_detail_view(request: AuthenticatedHttpRequest, run_id: UUID) -> HttpResponse:
    try:
        trace = selectors.trace_get(user=request.user, run_id=run_id)
    except ApplicationError:
        return _trace_missing(request, run_id)
    # The tree and the waterfall only: a span's inputs and outputs (a whole prompt per
    # LLM call) are fetched when the span is selected, or a long trace weighs megabytes.
    nodes = selectors.trace_flatten(roots=selectors.trace_tree(trace=trace, with_attributes=False))
    origin_ms, total_ms = _timeline(trace, nodes)
    rows = [_row(node, origin_ms, total_ms) for node in nodes]
    return render(
        request,
        "tracing/trace_detail.html",
        {
            "trace": trace,
            "rows": rows,
            "ticks": [
                {
                    "left": f"{fraction * 100:g}",
                    "label": format_duration(origin_ms + total_ms * fraction),
                }
                for fraction in (0, 0.25, 0.5, 0.75, 1)
            ],
            # Staff may open anyone's trace, but the conversation stays its owner's.
            "conversation_id": trace.run.conversation_id
            if trace.user_id == request.user.pk
            else None,
        },
    )


@login_required
@require_GET
def span_detail_view(
    request: AuthenticatedHttpRequest, run_id: UUID, span_id: UUID
) -> HttpResponse:
    """One span's detail panel as an HTML fragment, for the trace page to show when the
    span is selected. Same visibility as the trace page."""
    try:
        trace = selectors.trace_get(user=request.user, run_id=run_id)
        span = selectors.span_get(trace=trace, span_id=span_id)
    except ApplicationError as error:
        raise Http404(error.message) from error
    offset_ms = (span.started_at - trace.started_at).total_seconds() * 1000
    response = render(request, "tracing/_span_detail.html", {"span": _span_detail(span, offset_ms)})
    # Spans are written once and never change, but they are private: no shared caches.
    response["Cache-Control"] = "private, max-age=300"
    return response


def _trace_missing(request: AuthenticatedHttpRequest, run_id: UUID) -> HttpResponse:
    """No visible trace. If the user may see the run, say why (its trace is still being
    written, or tracing is off) rather than a bare 404; anyone else's run stays a 404."""
    try:
        absence = selectors.trace_absence(user=request.user, run_id=run_id)
    except ApplicationError as error:
        raise Http404(error.message) from error
    return render(
        request,
        "tracing/trace_pending.html",
        {
            "run": absence.run,
            "reason": absence.reason,
            "refresh_seconds": PENDING_REFRESH_SECONDS,
            "conversation_id": absence.conversation_id,
        },
        status=404 if absence.reason == "absent" else 200,
    )


def _timeline(trace: Trace, nodes: list[selectors.SpanNode]) -> tuple[float, float]:
    """Where the waterfall starts and how wide it is, in ms relative to the trace start.
    Normally 0 and the trace's duration; stretched if a span starts before the trace
    (clock skew between processes) or ends after it (a trace still running has no
    duration yet)."""
    origin = min([0.0, *(node.offset_ms for node in nodes)])
    end = max(
        [trace.duration_ms or 0.0, *(node.offset_ms + node.span.duration_ms for node in nodes)]
    )
    return origin, (end - origin) if end > origin else 1.0


def _row(node: selectors.SpanNode, origin_ms: float, total_ms: float) -> dict[str, Any]:
    """Everything the template shows for one span's row, precomputed: a 1,000-span
    trace is 1,000 loop iterations, so the template only prints values."""
    span = node.span
    left = min(max((node.offset_ms - origin_ms) / total_ms * 100, 0.0), 100.0)
    width = min(max(span.duration_ms / total_ms * 100, 0.0), 100.0 - left)
    return {
        "id": str(span.id),
        "kind": span.kind,
        "name": span.name,
        "status": span.status,
        "depth": node.depth,
        "level": node.depth + 1,
        "has_children": bool(node.children),
        "left": f"{left:.3f}",
        "width": f"{width:.3f}",
        "duration": format_duration(span.duration_ms),
    }


def _span_detail(span: Span, offset_ms: float) -> dict[str, Any]:
    """Everything the detail panel shows for one span, as plain text to be escaped."""
    return {
        "id": str(span.id),
        "kind": span.kind,
        "name": span.name,
        "status": span.status,
        "duration": format_duration(span.duration_ms),
        "offset": ("+" if offset_ms >= 0 else "") + format_duration(offset_ms),
        "started": timezone.localtime(span.started_at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
        "tokens": span.input_tokens + span.output_tokens,
        "tokens_text": f"{span.input_tokens:,} in · {span.output_tokens:,} out · "
        f"{span.cached_tokens:,} cached",
        "cost": format_usd(span.cost_usd),
        "error_type": span.error_type,
        "error_message": span.error_message,
        **_payloads(span),
    }


def _payloads(span: Span) -> dict[str, list[tuple[str, str]]]:
    """The span's attributes sorted into inputs, outputs, short facts and other blocks,
    each as (label, text) pairs of plain text for the template to escape."""
    attributes = (
        span.attributes if isinstance(span.attributes, dict) else {"value": span.attributes}
    )
    inputs = [(key, format_payload(attributes[key])) for key in INPUT_KEYS if key in attributes]
    outputs = [(key, format_payload(attributes[key])) for key in OUTPUT_KEYS if key in attributes]
    facts: list[tuple[str, str]] = []
    blocks: list[tuple[str, str]] = []
    for key, value in attributes.items():
        if key in INPUT_KEYS or key in OUTPUT_KEYS:
            continue
        compact = format_compact(value)
        if len(compact) <= SHORT_VALUE_CHARS and "\n" not in compact:
            facts.append((key, compact))
        else:
            blocks.append((key, format_payload(value)))
    return {"inputs": inputs, "outputs": outputs, "facts": facts, "blocks": blocks}
