"""OpenTelemetry export: when OTEL_EXPORTER_OTLP_ENDPOINT is set, each finished trace is
also sent over OTLP/HTTP, so Jaeger, Phoenix, Langfuse, ... can show it.

The spans are the ones already recorded (same ids: the trace id is the run id, a span
id is the low 64 bits of our span UUID), rebuilt as SDK spans with their real start and
end times and named per the OpenTelemetry GenAI semantic conventions. One export per
trace, in a worker thread, after the run has answered.

What GenAI-aware viewers (Langfuse, Phoenix, ...) read, on every span: its kind
(`gen_ai.operation.name`: `invoke_agent` for the run, `chat` for an LLM call,
`execute_tool` for a tool; `openinference.span.kind`, which also names graph nodes
`CHAIN`), the conversation (`gen_ai.conversation.id`, `session.id`) and the user
(`user.id`, `enduser.id`: the user's numeric id, never a name or an address). An LLM
span carries its cost in USD from the ledger as `gen_ai.usage.cost`; the run span the
run's total as `agentsite.run.cost_usd`, not under the same name, because viewers add up
`gen_ai.usage.cost` over a trace's spans and would count it twice. Unpriced: left out.

Message content (prompts, completions, tool arguments and results) is opt-in, as the
conventions ask: it leaves the process only when TRACING_EXPORT_CONTENT is true. It is
sent in the conventions' shape (`gen_ai.input.messages` / `gen_ai.output.messages`:
JSON lists of `{role, parts}`), translated from the LangChain shape the trace browser
stores. The trace browser, inside the app's own access control, always has it.
"""

import asyncio
import json
import logging
from collections.abc import Sequence
from decimal import Decimal
from functools import cache
from typing import TYPE_CHECKING, Any
from uuid import UUID

from channels.db import database_sync_to_async
from django.conf import settings
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from agentsite.otel import otel_span_id

from .models import Span, Trace

if TYPE_CHECKING:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

logger = logging.getLogger(__name__)

SCOPE = InstrumentationScope("agentsite.tracing", "1")
_pending: set[asyncio.Future[None]] = set()

# OpenInference's span kinds: what Phoenix and Langfuse read to tell an agent, a chain
# (here: a graph node), an LLM call and a tool apart.
_OPENINFERENCE_KINDS: dict[str, str] = {
    Span.Kind.RUN: "AGENT",
    Span.Kind.NODE: "CHAIN",
    Span.Kind.LLM: "LLM",
    Span.Kind.TOOL: "TOOL",
}
# LangChain's message types, as the GenAI conventions' roles.
_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}
# The providers' words for why a generation ended, as the conventions' finish reasons.
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_calls": "tool_call",
    "tool_use": "tool_call",
    "function_call": "tool_call",
}


def enabled() -> bool:
    return bool(settings.OTEL_EXPORTER_OTLP_ENDPOINT)


@cache
def _exporter(endpoint: str) -> "OTLPSpanExporter":
    # Imported here: the exporter and its protobuf code take about 3 MiB of memory that a
    # server without an OTLP endpoint never uses.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # The environment variable names the collector's base URL; the HTTP exporter wants
    # the traces endpoint itself (as the SDK does when it reads the variable itself).
    return OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=10)


@cache
def _resource(service_name: str) -> Resource:
    return Resource.create({"service.name": service_name})


def schedule(
    *,
    trace_id: UUID,
    spans: Sequence[Span],
    conversation_id: UUID | None = None,
    user_id: int | None = None,
    cost_usd: Decimal | None = None,
) -> None:
    """Export in a worker thread; the caller does not wait."""
    endpoint = settings.OTEL_EXPORTER_OTLP_ENDPOINT
    resource = _resource(settings.OTEL_SERVICE_NAME)
    content = settings.TRACING_EXPORT_CONTENT
    spans = list(spans)

    def export() -> None:
        _export(
            endpoint,
            otel_spans(
                trace_id,
                spans,
                resource,
                content=content,
                conversation_id=conversation_id,
                user_id=user_id,
                cost_usd=cost_usd,
            ),
            trace_id,
        )

    future = asyncio.get_running_loop().run_in_executor(None, export)
    _pending.add(future)
    future.add_done_callback(_pending.discard)


async def schedule_stored(*, trace_id: UUID, conversation_id: UUID | None = None) -> None:
    """Export a trace as the database has it: one closed without its tracer (a run whose
    process died), which therefore never scheduled it."""
    if not enabled():
        return
    try:
        trace, spans = await database_sync_to_async(_stored)(trace_id)
    except Exception:
        logger.exception("trace %s: could not be read for its OTLP export", trace_id)
        return
    if trace is not None:
        schedule(
            trace_id=trace_id,
            spans=spans,
            conversation_id=conversation_id,
            user_id=trace.user_id,
            cost_usd=trace.cost_usd,
        )


def _stored(trace_id: UUID) -> tuple[Trace | None, list[Span]]:
    trace = Trace.objects.filter(run_id=trace_id).first()
    return trace, list(Span.objects.filter(trace_id=trace_id).order_by("started_at"))


async def drain() -> None:
    """Wait for the exports under way (tests, and a clean shutdown)."""
    if _pending:
        await asyncio.gather(*_pending, return_exceptions=True)


def _export(endpoint: str, spans: list[ReadableSpan], trace_id: UUID) -> None:
    try:
        result = _exporter(endpoint).export(spans)
        if result.name != "SUCCESS":
            logger.warning("trace %s: OTLP export to %s failed", trace_id, endpoint)
    except Exception:
        logger.exception("trace %s: OTLP export to %s failed", trace_id, endpoint)


def otel_spans(
    trace_id: UUID,
    spans: Sequence[Span],
    resource: Resource,
    *,
    content: bool = False,
    conversation_id: UUID | None = None,
    user_id: int | None = None,
    cost_usd: Decimal | None = None,
) -> list[ReadableSpan]:
    """The spans as SDK spans; `content`: include prompts, completions, tool arguments
    and results. `conversation_id` and `user_id` go on every span (a viewer groups a
    trace into its session and user from whichever span it reads first); `cost_usd`,
    the run's total, on the run span."""

    def context(span_id: UUID) -> SpanContext:
        return SpanContext(
            trace_id=trace_id.int,
            span_id=otel_span_id(span_id),
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )

    conversation = str(conversation_id) if conversation_id else None
    user = str(user_id) if user_id is not None else None
    shared = {
        "agentsite.run_id": str(trace_id),
        "gen_ai.conversation.id": conversation,
        "session.id": conversation,
        "user.id": user,
        "enduser.id": user,
    }
    out = []
    for span in spans:
        name, kind, attributes = _describe(span, content)
        attributes.update(shared)
        attributes["agentsite.span.kind"] = span.kind
        attributes["openinference.span.kind"] = _OPENINFERENCE_KINDS.get(span.kind)
        if span.kind == Span.Kind.RUN:
            attributes["agentsite.run.cost_usd"] = _usd(cost_usd)
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


def _usd(amount: Decimal | None) -> float | None:
    # OTLP has no decimal type; a double keeps well over the 8 places the ledger has.
    return None if amount is None else float(amount)


def _describe(span: Span, content: bool) -> tuple[str, SpanKind, dict[str, Any]]:
    a = span.attributes or {}
    if span.kind == Span.Kind.LLM:
        model = a.get("model") or span.name
        request = a.get("request") or {}
        finish_reason = _finish_reason(a)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": a.get("provider"),
            # The older name, still what several backends read.
            "gen_ai.system": a.get("provider"),
            "gen_ai.request.model": model,
            "gen_ai.request.temperature": request.get("temperature"),
            "gen_ai.request.max_tokens": request.get("max_tokens"),
            "gen_ai.response.model": a.get("response_model"),
            "gen_ai.response.finish_reasons": [finish_reason] if finish_reason else None,
            "gen_ai.usage.input_tokens": span.input_tokens,
            "gen_ai.usage.output_tokens": span.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": span.cached_tokens or None,
            "gen_ai.usage.cost": _usd(span.cost_usd),
            "agentsite.time_to_first_token_ms": a.get("time_to_first_token_ms"),
        }
        if content:
            attributes["gen_ai.input.messages"] = _json(
                [_genai_message(m) for m in a.get("prompt") or []]
            )
            # Earlier messages of the conversation the span did not record.
            attributes["agentsite.prompt_omitted_messages"] = a.get("prompt_omitted")
            completion = a.get("completion")
            if completion:
                output = _genai_message(completion)
                output["finish_reason"] = finish_reason or (
                    "tool_call" if completion.get("tool_calls") else "stop"
                )
                attributes["gen_ai.output.messages"] = _json([output])
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
                arguments if isinstance(arguments, str) else _json(arguments)
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
    return (
        span.name,
        SpanKind.INTERNAL,
        {"langgraph.node": span.name, "langgraph.step": a.get("langgraph.step")},
    )


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _finish_reason(attributes: dict[str, Any]) -> str | None:
    reason = attributes.get("finish_reason")
    return _FINISH_REASONS.get(reason, reason) if reason else None


def _genai_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as the trace stores it (LangChain's shape: `role` is the message type,
    text in `content`, `tool_calls`, `tool_call_id`) in the GenAI conventions' shape:
    a role and a list of typed parts."""
    role = _ROLES.get(message.get("role", ""), message.get("role", ""))
    parts: list[dict[str, Any]] = []
    if role == "tool":
        # A tool's result goes back to the model as the response to its call.
        parts.append(
            {
                "type": "tool_call_response",
                "id": message.get("tool_call_id"),
                "response": message.get("content", ""),
            }
        )
    elif message.get("content"):
        parts.append({"type": "text", "content": message["content"]})
    for call in message.get("tool_calls") or []:
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id"),
                "name": call["name"],
                "arguments": call.get("args"),
            }
        )
    return {"role": role, "parts": parts}
