"""The OTLP export against a real OTLP/HTTP receiver on 127.0.0.1 (stdlib HTTP server,
protobuf decoded with opentelemetry-proto) that, like a GenAI-aware viewer, reads the
messages in the OpenTelemetry GenAI conventions' shape and refuses any other."""

import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from channels.db import database_sync_to_async
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from billing.models import ModelPrice, UsageRecord
from chat.models import Run
from conftest import cancelled_mid_answer
from tracing import export
from tracing.models import Span, Trace
from tracing.tests.test_capture import run_message

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "agentsite-offline-demo"

# From the conventions' JSON schemas (gen-ai-input-messages.json and
# gen-ai-output-messages.json in open-telemetry/semantic-conventions): a message is
# {role, parts, [name]}, an output message also has a finish_reason; these are the part
# types Agentsite sends, each with its required fields.
ROLES = {"system", "user", "assistant", "tool"}
FINISH_REASONS = {"stop", "length", "content_filter", "tool_call", "error"}
PARTS: dict[str, dict[str, tuple[type, ...]]] = {
    "text": {"content": (str,)},
    "tool_call": {"id": (str, type(None)), "name": (str,)},
    "tool_call_response": {"id": (str, type(None)), "response": (object,)},
}


def schema_errors(value: str, *, output: bool) -> list[str]:
    """What is wrong with a gen_ai.input.messages / gen_ai.output.messages value."""
    try:
        messages = json.loads(value)
    except ValueError:
        return ["not JSON"]
    if not isinstance(messages, list):
        return ["not a list of messages"]
    errors = []
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            errors.append(f"{where}: not an object")
            continue
        if message.get("role") not in ROLES:
            errors.append(f"{where}: role {message.get('role')!r}")
        if output and message.get("finish_reason") not in FINISH_REASONS:
            errors.append(f"{where}: finish_reason {message.get('finish_reason')!r}")
        parts = message.get("parts")
        if not isinstance(parts, list):
            errors.append(f"{where}: no parts")
            continue
        for j, part in enumerate(parts):
            fields = PARTS.get(part.get("type")) if isinstance(part, dict) else None
            if fields is None:
                errors.append(f"{where} part {j}: type {part!r}")
                continue
            for field, types in fields.items():
                if field not in part and type(None) not in types:
                    errors.append(f"{where} part {j}: no {field}")
                elif not isinstance(part.get(field), types):
                    errors.append(f"{where} part {j}: {field} {part.get(field)!r}")
    return errors


def value_of(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in any_value.array_value.values]
    return getattr(any_value, kind)


def attrs(span: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in span.attributes}


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/v1/traces"
        assert self.headers["Content-Type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        errors = [
            f"{span.name}: {key}: {error}"
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
            for key, output in (("gen_ai.input.messages", False), ("gen_ai.output.messages", True))
            if key in attrs(span)
            for error in schema_errors(attrs(span)[key], output=output)
        ]
        self.server.errors += errors
        self.server.received.append(request)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(400 if errors else 200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def collector(settings):
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    server.received = []
    server.errors = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = f"http://127.0.0.1:{server.server_port}"
    yield server
    server.shutdown()
    server.server_close()


def received_spans(collector):
    return [
        span
        for request in collector.received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]


def test_the_schema_checks_refuse_langchains_shape():
    # What was exported before: LangChain's message types and a bare content string.
    assert schema_errors('[{"role": "human", "content": "hi"}]', output=False) == [
        "message 0: role 'human'",
        "message 0: no parts",
    ]
    assert schema_errors(
        '[{"role": "assistant", "parts": [{"type": "text", "content": "hi"}]}]', output=True
    ) == ["message 0: finish_reason None"]
    assert schema_errors(
        '[{"role": "assistant", "parts": [{"type": "tool_call", "args": {}}]}]', output=False
    ) == ["message 0 part 0: no name"]


async def test_spans_are_exported_over_otlp_with_genai_attributes(make_user, collector):
    await ModelPrice.objects.aupdate_or_create(
        model=MODEL,
        defaults={"input_per_mtok": Decimal("2"), "output_per_mtok": Decimal("8")},
    )
    user = await database_sync_to_async(make_user)()
    run, _, _ = await run_message(user, "What is 2*3 and 4*5?")
    await export.drain()

    assert collector.errors == []
    [request] = collector.received
    [resource_spans] = request.resource_spans
    service = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert service["service.name"] == "agentsite"
    spans = received_spans(collector)
    trace = await Trace.objects.aget(run=run)
    assert len(spans) == trace.span_count == 8
    assert {s.trace_id for s in spans} == {run.id.bytes}

    by_id = {s.span_id: s for s in spans}
    ours = {
        export.otel_span_id(s.id).to_bytes(8, "big"): s
        async for s in Span.objects.filter(trace=trace)
    }
    assert set(by_id) == set(ours)
    for span_id, span in by_id.items():
        parent = ours[span_id].parent_id
        expected = export.otel_span_id(parent).to_bytes(8, "big") if parent else b""
        assert span.parent_span_id == expected
        assert span.start_time_unix_nano <= span.end_time_unix_nano

    def name_of(span_id):
        return by_id[span_id].name if span_id in by_id else ""

    edges = sorted((name_of(s.parent_span_id), s.name) for s in spans)
    assert edges == sorted(
        [
            ("", "invoke_agent agentsite"),
            ("invoke_agent agentsite", "call_model"),
            ("invoke_agent agentsite", "call_model"),
            ("invoke_agent agentsite", "tools"),
            ("call_model", f"chat {MODEL}"),
            ("call_model", f"chat {MODEL}"),
            ("tools", "execute_tool calculator"),
            ("tools", "execute_tool calculator"),
        ]
    )
    # Every span has a kind a GenAI-aware viewer recognises, and names the conversation
    # (its session) and the user.
    kinds = sorted(
        (a.get("gen_ai.operation.name", ""), a["openinference.span.kind"])
        for a in map(attrs, spans)
    )
    assert kinds == sorted(
        [("invoke_agent", "AGENT")]
        + [("", "CHAIN")] * 3
        + [("chat", "LLM")] * 2
        + [("execute_tool", "TOOL")] * 2
    )
    for a in map(attrs, spans):
        assert a["gen_ai.conversation.id"] == a["session.id"] == str(run.conversation_id)
        assert a["user.id"] == a["enduser.id"] == str(user.pk)

    chat = [attrs(s) for s in spans if s.name.startswith("chat ")]
    assert all(a["gen_ai.request.model"] == MODEL for a in chat)
    assert sum(a["gen_ai.usage.input_tokens"] for a in chat) == run.input_tokens
    assert sum(a["gen_ai.usage.output_tokens"] for a in chat) == run.output_tokens
    assert chat[-1]["gen_ai.response.finish_reasons"] == ["stop"]
    # Each call's cost is the ledger's, and the run's total is on the run span only
    # (viewers add up gen_ai.usage.cost over a trace).
    ledger = {
        export.otel_span_id(row.span_id).to_bytes(8, "big"): row.cost_usd
        async for row in UsageRecord.objects.filter(run_id=run.id)
    }
    assert len(ledger) == 2 and all(cost > 0 for cost in ledger.values())
    assert {
        s.span_id: attrs(s)["gen_ai.usage.cost"] for s in spans if s.name.startswith("chat ")
    } == {span_id: pytest.approx(float(cost)) for span_id, cost in ledger.items()}
    [agent] = [attrs(s) for s in spans if s.name == "invoke_agent agentsite"]
    assert run.cost_usd == sum(ledger.values())
    assert agent["agentsite.run.cost_usd"] == pytest.approx(float(run.cost_usd))
    assert "gen_ai.usage.cost" not in agent

    tool = [attrs(s) for s in spans if s.name.startswith("execute_tool")]
    assert {a["gen_ai.tool.name"] for a in tool} == {"calculator"}
    assert all(a["gen_ai.tool.call.id"] for a in tool)
    # Message content is opt-in (TRACING_EXPORT_CONTENT), as the conventions ask.
    content = {
        "gen_ai.input.messages",
        "gen_ai.output.messages",
        "gen_ai.tool.call.arguments",
        "gen_ai.tool.call.result",
    }
    assert not any(content & attrs(s).keys() for s in spans)


async def test_messages_are_exported_in_the_genai_shape_when_content_is_on(
    make_user, settings, collector
):
    settings.TRACING_EXPORT_CONTENT = True
    user = await database_sync_to_async(make_user)()
    await run_message(user, "What is 2*3 and 4*5?")
    await export.drain()

    assert collector.errors == []  # the receiver checked every message against the schema
    spans = received_spans(collector)
    first, second = (
        {key: json.loads(a[key]) for key in ("gen_ai.input.messages", "gen_ai.output.messages")}
        for a in (attrs(s) for s in spans if s.name.startswith("chat "))
    )
    system, question = first["gen_ai.input.messages"]
    assert system["role"] == "system" and system["parts"][0]["type"] == "text"
    assert question == {
        "role": "user",
        "parts": [{"type": "text", "content": "What is 2*3 and 4*5?"}],
    }
    # The model's tool calls, then the tools' answers, as the next call's input.
    [asked] = first["gen_ai.output.messages"]
    calls = [p for p in asked["parts"] if p["type"] == "tool_call"]
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("calculator", {"expression": "2*3"}),
        ("calculator", {"expression": "4*5"}),
    ]
    history = second["gen_ai.input.messages"]
    # The system prompt is dated anew for each call (the seconds may tick between them).
    assert history[0]["role"] == "system" and history[1] == question
    assert history[2] == {"role": "assistant", "parts": asked["parts"]}
    assert history[3:] == [
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": c["id"], "response": r}]}
        for c, r in zip(calls, ["6", "20"], strict=True)
    ]
    [answer] = second["gen_ai.output.messages"]
    assert answer["role"] == "assistant" and answer["finish_reason"] == "stop"
    assert "20" in answer["parts"][0]["content"]

    tool = [attrs(s) for s in spans if s.name.startswith("execute_tool")]
    assert sorted(json.loads(a["gen_ai.tool.call.arguments"])["expression"] for a in tool) == [
        "2*3",
        "4*5",
    ]
    assert {a["gen_ai.tool.call.result"] for a in tool} == {"6", "20"}


async def test_an_exported_prompt_says_how_many_messages_its_span_left_out(
    make_user, settings, collector
):
    settings.TRACING_EXPORT_CONTENT = True
    settings.TRACING_MAX_PROMPT_MESSAGES = 1
    user = await database_sync_to_async(make_user)()
    await run_message(user, "What is 2*3?")
    await export.drain()

    first, second = (attrs(s) for s in received_spans(collector) if s.name.startswith("chat "))
    # The first call's prompt is the system prompt and the question: nothing left out.
    assert "agentsite.prompt_omitted_messages" not in first
    # The second's also held the question and the tool call before the tool's result.
    assert second["agentsite.prompt_omitted_messages"] == 2
    assert [m["role"] for m in json.loads(second["gen_ai.input.messages"])] == ["system", "tool"]


async def test_a_cancelled_call_exports_the_tokens_the_ledger_billed(
    make_user, settings, collector
):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    conversation = await cancelled_mid_answer(user)
    await export.drain()

    run = await Run.objects.aget(conversation=conversation)
    [billed] = [row async for row in UsageRecord.objects.filter(run_id=run.id)]
    assert billed.input_tokens > 0 and billed.output_tokens > 0
    [chat] = [attrs(s) for s in received_spans(collector) if s.name.startswith("chat ")]
    assert chat["error.type"] == "cancelled"
    assert (chat["gen_ai.usage.input_tokens"], chat["gen_ai.usage.output_tokens"]) == (
        billed.input_tokens,
        billed.output_tokens,
    )
