import json
import logging

from agentsite.logging import ContextFilter, JsonFormatter, run_id_var, span_id_var


def log_line(run_id: str | None, span_id: str | None) -> dict:
    run_token = run_id_var.set(run_id)
    span_token = span_id_var.set(span_id)
    try:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
        ContextFilter().filter(record)
    finally:
        span_id_var.reset(span_token)
        run_id_var.reset(run_token)
    return json.loads(JsonFormatter().format(record))


def test_json_logs_carry_the_run_id_and_the_opentelemetry_trace_and_span_ids():
    run_id = "3f2a0c4e-1b7d-4c59-9e8a-0d6f5b4a3c21"
    span_id = "8c1e2d3f-4a5b-4c6d-8e7f-90a1b2c3d4e5"
    line = log_line(run_id, span_id)
    assert line["message"] == "hello you"
    assert line["run_id"] == run_id
    # As OpenTelemetry writes them: the trace id is the run id, the span id the low 64
    # bits of the span's UUID.
    assert line["trace_id"] == "3f2a0c4e1b7d4c599e8a0d6f5b4a3c21"
    assert line["span_id"] == "8e7f90a1b2c3d4e5"
    assert "request_id" not in line  # an id that is not set is left out


def test_a_line_outside_any_span_has_no_trace_or_span_id():
    line = log_line("3f2a0c4e-1b7d-4c59-9e8a-0d6f5b4a3c21", None)
    assert "trace_id" not in line and "span_id" not in line
    assert "trace_id" not in log_line(None, None)


def test_each_request_gets_an_id_echoed_in_its_response(client, db):
    assert client.get("/login/", HTTP_X_REQUEST_ID="abc-123")["X-Request-ID"] == "abc-123"
    # Anything that does not look like an id is replaced rather than echoed.
    assert len(client.get("/login/", HTTP_X_REQUEST_ID="bad id!")["X-Request-ID"]) == 32
