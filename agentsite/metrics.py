"""Prometheus metrics, served at /metrics when METRICS_ENABLED.

The endpoint is unauthenticated (scrapers rarely carry sessions); it exposes counts and
timings only, never ids or content. Restrict it at the proxy in a public deployment.

Labelled series whose label values are known in advance (run statuses, tools, the
configured model) are created at 0 when the server starts (`metrics_preinitialise`), so
a dashboard or an alert on `status="failed"` sees 0 instead of nothing until the first
one happens.
"""

from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

RUNS = Counter("agentsite_runs", "Runs finished, by final status.", ["status"])
RUN_DURATION = Histogram(
    "agentsite_run_duration_seconds",
    "Wall-clock time of a run, start to final event.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
LLM_LATENCY = Histogram(
    "agentsite_llm_call_duration_seconds",
    "Latency of one LLM call (request to last token).",
    ["model"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKENS = Counter("agentsite_llm_tokens", "LLM tokens, by direction.", ["direction", "model"])
TOKEN_DIRECTIONS = ("input", "output", "cached")
RUN_ERRORS = Counter(
    "agentsite_run_errors",
    "Runs that ended with an error, by its code (a user's cancel is not an error).",
    ["code"],
)
TOOL_CALLS = Counter(
    "agentsite_tool_calls", "Tool calls finished, by tool and outcome.", ["tool", "outcome"]
)
TOOL_OUTCOMES = ("ok", "error")
# A tool name the model made up is counted under this one, so the series stay bounded.
OTHER_TOOL = "other"
LLM_COST = Counter(
    "agentsite_llm_cost_usd",
    "What LLM calls cost in USD, by model, as the usage ledger priced them (unpriced calls "
    "are not counted).",
    ["model"],
)
ACTIVE_RUNS = Gauge("agentsite_active_runs", "Runs executing in this process.")
OPEN_WEBSOCKETS = Gauge("agentsite_open_websockets", "Chat WebSockets open on this process.")


def metrics_preinitialise(
    *, run_statuses: Iterable[str], tools: Iterable[str], models: Iterable[str]
) -> None:
    """Create the series of every label value known in advance, at 0."""
    for status in run_statuses:
        RUNS.labels(status=status)
    for tool in (*tools, OTHER_TOOL):
        for outcome in TOOL_OUTCOMES:
            TOOL_CALLS.labels(tool=tool, outcome=outcome)
    for model in models:
        LLM_LATENCY.labels(model=model)
        LLM_COST.labels(model=model)
        for direction in TOKEN_DIRECTIONS:
            TOKENS.labels(direction=direction, model=model)


def llm_cost_observe(*, model: str, costs: Iterable[Decimal | None]) -> None:
    LLM_COST.labels(model=model).inc(float(sum((c for c in costs if c), Decimal(0))))


def metrics_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    if not settings.METRICS_ENABLED:
        raise Http404
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
