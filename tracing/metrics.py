"""Feeds the LLM metrics from a finished trace's spans (computed once, at finish).

So with TRACING_ENABLED=false the LLM latency and token metrics stay empty (the run
metrics, fed by the runner, do not depend on tracing)."""

from collections.abc import Sequence

from agentsite import metrics

from .models import Span


def observe_llm_spans(spans: Sequence[Span]) -> None:
    metrics.observe_llm_calls(
        (
            str(span.attributes.get("model") or span.name),
            span.duration_ms / 1000,
            span.input_tokens,
            span.output_tokens,
            span.cached_tokens,
        )
        for span in spans
        if span.kind == Span.Kind.LLM
    )
