"""OpenTelemetry export: when OTEL_EXPORTER_OTLP_ENDPOINT is set, each finished trace is
also sent over OTLP/HTTP, so Jaeger, Phoenix, Langfuse, ... can show it.

The spans are the ones already recorded (same ids: the trace id is the run id, a span
id is the low 64 bits of our span UUID), rebuilt as SDK spans with their real start and
end times and named per the OpenTelemetry GenAI semantic conventions. One export per
trace, in a worker thread, after the run has answered.

Message content (prompts, completions, tool arguments and results) is opt-in, as the
conventions ask: it leaves the process only when TRACING_EXPORT_CONTENT is true. The
trace browser, inside the app's own access control, always has it.
"""

import asyncio
import json
import logging
from collections.abc import Sequence
from functools import cache
from typing import Any
from uuid import UUID

from django.conf import settings
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from .models import Span

logger = logging.getLogger(__name__)

SCOPE = InstrumentationScope("agentsite.tracing", "1")
_pending: set[asyncio.Future[None]] = set()


def enabled() -> bool:
    return bool(settings.OTEL_EXPORTER_OTLP_ENDPOINT)


@cache
def _exporter(endpoint: str) -> OTLPSpanExporter:
    # The environment variable names the collector's base URL; the HTTP exporter wants
    # the traces endpoint itself (as the SDK does when it reads the variable itself).
    return OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=10)


@cache
def _resource(service_name: str) -> Resource:
    return Resource.create({"service.name": service_name})


def schedule(*, trace_id: UUID, spans: Sequence[Span]) -> None:
    """Export in a worker thread; the caller does not wait."""
    endpoint = settings.OTEL_EXPORTER_OTLP_ENDPOINT
    resource = _resource(settings.OTEL_SERVICE_NAME)
    content = settings.TRACING_EXPORT_CONTENT
    future = asyncio.get_running_loop().run_in_executor(
        None, _export, endpoint, resource, trace_id, list(spans), content
    )
    _pending.add(future)
    future.add_done_callback(_pending.discard)


async def drain() -> None:
    """Wait for the exports under way (tests, and a clean shutdown)."""
    if _pending:
        await asyncio.gather(*_pending, return_exceptions=True)


def _export(
    endpoint: str, resource: Resource, trace_id: UUID, spans: list[Span], content: bool
) -> None:
    try:
        result = _exporter(endpoint).export(otel_spans(trace_id, spans, resource, content=content))
        if result.name != "SUCCESS":
            logger.warning("trace %s: OTLP export to %s failed", trace_id, endpoint)
    except Exception:
        logger.exception("trace %s: OTLP export to %s failed", trace_id, endpoint)


def otel_span_id(span_id: UUID) -> int:
    return (span_id.int & 0xFFFF_FFFF_FFFF_FFFF) or 1


def otel_spans(
    trace_id: UUID, spans: Sequence[Span], resource: Resource, *, content: bool = False
) -> list[ReadableSpan]:
    """The spans as SDK spans; `content`: include prompts, completions, tool arguments
    and results."""

    def context(span_id: UUID) -> SpanContext:
        return SpanContext(
            trace_id=trace_id.int,
            span_id=otel_span_id(span_id),
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )

    out = []
    for span in spans:
        name, kind, attributes = _describe(span, content)
        attributes["agentsite.span.kind"] = span.kind
        attributes["agentsite.run_id"] = str(trace_id)
        if span.status == Span.Status.OK:
            status = Status(StatusCode.OK)
        else:
            status = Status(StatusCode.ERROR, span.error_message or span.status)
            attributes["error.type"] = span.error_type or span.status
        out.append(
            ReadableSpan(
                name=name,
                context=context(span.id),
                parent=context(span.parent_id) if span.parent_id else None,
                resource=resource,
                attributes={k: v for k, v in attributes.items() if v is not None},
                kind=kind,
                status=status,
                start_time=_ns(span.started_at.timestamp()),
                end_time=_ns(span.ended_at.timestamp()),
                instrumentation_scope=SCOPE,
            )
        )
    return out


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def _describe(span: Span, content: bool) -> tuple[str, SpanKind, dict[str, Any]]:
    a = span.attributes or {}
    if span.kind == Span.Kind.LLM:
        model = a.get("model") or span.name
        request = a.get("request") or {}
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": a.get("provider"),
            # The older name, still what several backends read.
            "gen_ai.system": a.get("provider"),
            "gen_ai.request.model": model,
            "gen_ai.request.temperature": request.get("temperature"),
            "gen_ai.request.max_tokens": request.get("max_tokens"),
            "gen_ai.response.model": a.get("response_model"),
            "gen_ai.response.finish_reasons": [a["finish_reason"]]
            if a.get("finish_reason")
            else None,
            "gen_ai.usage.input_tokens": span.input_tokens,
            "gen_ai.usage.output_tokens": span.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": span.cached_tokens or None,
            "agentsite.time_to_first_token_ms": a.get("time_to_first_token_ms"),
        }
        if content:
            attributes["gen_ai.input.messages"] = json.dumps(
                a.get("prompt") or [], ensure_ascii=False
            )
            attributes["gen_ai.output.messages"] = json.dumps(
                [a["completion"]] if a.get("completion") else [], ensure_ascii=False
            )
        return f"chat {model}", SpanKind.CLIENT, attributes
    if span.kind == Span.Kind.TOOL:
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": span.name,
            "gen_ai.tool.call.id": a.get("tool_call_id"),
        }
        if content:
            arguments = a.get("arguments")
            attributes["gen_ai.tool.call.arguments"] = (
                arguments
                if isinstance(arguments, str)
                else json.dumps(arguments, ensure_ascii=False)
            )
            attributes["gen_ai.tool.call.result"] = a.get("result")
        return f"execute_tool {span.name}", SpanKind.INTERNAL, attributes
    if span.kind == Span.Kind.RUN:
        return (
            "invoke_agent agentsite",
            SpanKind.INTERNAL,
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": "agentsite",
                "gen_ai.provider.name": a.get("provider"),
                "gen_ai.request.model": a.get("model"),
            },
        )
    return span.name, SpanKind.INTERNAL, {"langgraph.node": span.name}
