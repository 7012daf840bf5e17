"""The OTLP export against a real OTLP/HTTP receiver on 127.0.0.1 (stdlib HTTP server,
protobuf decoded with opentelemetry-proto)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from channels.db import database_sync_to_async
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tracing import export
from tracing.models import Span, Trace
from tracing.tests.test_capture import run_message

pytestmark = pytest.mark.django_db(transaction=True)


class Receiver(BaseHTTPRequestHandler):
    received: list[ExportTraceServiceRequest]

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/v1/traces"
        assert self.headers["Content-Type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.received.append(request)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def collector():
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def attrs(span):
    out = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = (
            [x.string_value for x in v.array_value.values]
            if kind == "array_value"
            else getattr(v, kind)
        )
    return out


async def test_spans_are_exported_over_otlp_with_genai_attributes(make_user, settings, collector):
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = f"http://127.0.0.1:{collector.server_port}"
    user = await database_sync_to_async(make_user)()
    run, _, _ = await run_message(user, "What is 2*3 and 4*5?")
    await export.drain()

    [request] = collector.received
    [resource_spans] = request.resource_spans
    service = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert service["service.name"] == "agentsite"
    spans = [s for scope in resource_spans.scope_spans for s in scope.spans]
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
            ("call_model", "chat agentsite-offline-demo"),
            ("call_model", "chat agentsite-offline-demo"),
            ("tools", "execute_tool calculator"),
            ("tools", "execute_tool calculator"),
        ]
    )
    chat = [attrs(s) for s in spans if s.name.startswith("chat ")]
    assert all(a["gen_ai.operation.name"] == "chat" for a in chat)
    assert all(a["gen_ai.request.model"] == "agentsite-offline-demo" for a in chat)
    assert sum(a["gen_ai.usage.input_tokens"] for a in chat) == run.input_tokens
    assert sum(a["gen_ai.usage.output_tokens"] for a in chat) == run.output_tokens
    assert chat[-1]["gen_ai.response.finish_reasons"] == ["stop"]
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


async def test_message_content_is_exported_when_enabled(make_user, settings, collector):
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = f"http://127.0.0.1:{collector.server_port}"
    settings.TRACING_EXPORT_CONTENT = True
    user = await database_sync_to_async(make_user)()
    await run_message(user, "What is 2*3 and 4*5?")
    await export.drain()

    [request] = collector.received
    spans = [s for r in request.resource_spans for scope in r.scope_spans for s in scope.spans]
    chat = [attrs(s) for s in spans if s.name.startswith("chat ")]
    first_prompt = json.loads(chat[0]["gen_ai.input.messages"])
    assert first_prompt[0]["role"] == "system"
    assert first_prompt[-1] == {"role": "human", "content": "What is 2*3 and 4*5?"}
    assert "20" in json.loads(chat[-1]["gen_ai.output.messages"])[0]["content"]
    tool = [attrs(s) for s in spans if s.name.startswith("execute_tool")]
    assert sorted(json.loads(a["gen_ai.tool.call.arguments"])["expression"] for a in tool) == [
        "2*3",
        "4*5",
    ]
    assert {a["gen_ai.tool.call.result"] for a in tool} == {"6", "20"}
