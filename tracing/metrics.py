"""Feeds the LLM metrics from a finished trace's spans (computed once, at finish).

So with TRACING_ENABLED=false the LLM latency and token metrics stay empty (the run
metrics, fed by the runner, do not depend on tracing)."""

from collections.abc import Sequence

from agentsite.metrics import LLM_LATENCY, TOKENS

from .models import Span


def observe_llm_spans(spans: Sequence[Span]) -> None:
    for span in spans:
        if span.kind != Span.Kind.LLM:
            continue
        model = str(span.attributes.get("model") or span.name)
        LLM_LATENCY.labels(model=model).observe(span.duration_ms / 1000)
        TOKENS.labels(direction="input", model=model).inc(span.input_tokens)
        TOKENS.labels(direction="output", model=model).inc(span.output_tokens)
        if span.cached_tokens:
            TOKENS.labels(direction="cached", model=model).inc(span.cached_tokens)
