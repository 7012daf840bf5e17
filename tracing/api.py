from typing import Any
from uuid import UUID

from django.http import HttpRequest
from ninja import Router

from agentsite.api_errors import errors
from agentsite.auth import Scope, owned_or_404, require_scope

from . import selectors
from .models import Trace
from .schemas import TraceOut
from .selectors import SpanNode

router = Router(tags=["traces"])


@router.get("/runs/{run_id}/trace", response={200: TraceOut, **errors(401, 403, 404, 422, 429)})
def run_trace(request: HttpRequest, run_id: UUID) -> dict[str, Any]:
    """The span tree of a run: run → graph node → LLM call / tool call → …"""
    caller = require_scope(request, Scope.TRACES)
    # Its user's traces only, even for staff: operators browse everyone's in the app,
    # and a key handed to a program must not carry an operator's view.
    trace = owned_or_404(
        Trace.objects.all(), principal=caller, name="trace", owner_field="user", run_id=run_id
    )
    roots = selectors.trace_tree(trace=trace)
    return {
        **{field: getattr(trace, field) for field in TraceOut.model_fields if field != "spans"},
        "spans": [_span_out(node) for node in roots],
    }


def _span_out(node: SpanNode) -> dict[str, Any]:
    span = node.span
    return {
        "id": span.id,
        "parent_id": span.parent_id,
        "kind": span.kind,
        "name": span.name,
        "status": span.status,
        "started_at": span.started_at,
        "ended_at": span.ended_at,
        "duration_ms": span.duration_ms,
        "offset_ms": node.offset_ms,
        "attributes": span.attributes,
        "input_tokens": span.input_tokens,
        "output_tokens": span.output_tokens,
        "cached_tokens": span.cached_tokens,
        "cost_usd": span.cost_usd,
        "error_type": span.error_type,
        "error_message": span.error_message,
        "children": [_span_out(child) for child in node.children],
    }
