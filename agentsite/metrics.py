"""Prometheus metrics, served at /metrics when METRICS_ENABLED.

The endpoint is unauthenticated (scrapers rarely carry sessions); it exposes counts and
timings only, never ids or content. Restrict it at the proxy in a public deployment.
"""

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
ACTIVE_RUNS = Gauge("agentsite_active_runs", "Runs executing in this process.")
OPEN_WEBSOCKETS = Gauge("agentsite_open_websockets", "Chat WebSockets open on this process.")


def metrics_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    if not settings.METRICS_ENABLED:
        raise Http404
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
