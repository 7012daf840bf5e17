"""The trace pages: a filterable list of traces and one trace as a tree, a waterfall and
span details. Thin: validate, call a selector, shape rows for the template."""

from typing import Any
from uuid import UUID

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from agentsite.errors import ApplicationError
from chat.views import AuthenticatedHttpRequest

from . import selectors
from .formatting import format_compact, format_duration, format_payload, format_usd
from .forms import TraceFilterForm
from .models import Span, Trace

TRACES_PER_PAGE = 50

# Attribute keys shown as a span's inputs and outputs, in this order; whatever else a
# span carries is shown below them, so nothing captured is hidden from the person.
INPUT_KEYS = ("inputs", "input", "prompt", "messages", "arguments", "args")
OUTPUT_KEYS = ("outputs", "output", "completion", "response", "result")
# A scalar attribute longer than this reads better as a block than in the facts table.
SHORT_VALUE_CHARS = 80


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
def trace_detail_view(request: AuthenticatedHttpRequest, run_id: UUID) -> HttpResponse:
    try:
        trace = selectors.trace_get(user=request.user, run_id=run_id)
    except ApplicationError as error:
        # Another user's trace is as invisible as a missing one.
        raise Http404(error.message) from error
    nodes = selectors.trace_flatten(roots=selectors.trace_tree(trace=trace))
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
    """Everything the template shows for one span, precomputed: a 1,000-span trace is
    1,000 loop iterations, so the template only prints values."""
    span = node.span
    left = min(max((node.offset_ms - origin_ms) / total_ms * 100, 0.0), 100.0)
    width = min(max(span.duration_ms / total_ms * 100, 0.0), 100.0 - left)
    tokens = span.input_tokens + span.output_tokens
    return {
        "id": str(span.id),
        "parent_id": str(span.parent_id) if span.parent_id else "",
        "kind": span.kind,
        "name": span.name,
        "status": span.status,
        "depth": node.depth,
        "level": node.depth + 1,
        "has_children": bool(node.children),
        "left": f"{left:.3f}",
        "width": f"{width:.3f}",
        "duration": format_duration(span.duration_ms),
        "offset": ("+" if node.offset_ms >= 0 else "") + format_duration(node.offset_ms),
        "started": timezone.localtime(span.started_at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
        "tokens": tokens,
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
