import json
import logging

from agentsite.logging import ContextFilter, JsonFormatter, run_id_var, span_id_var


def test_json_logs_carry_the_run_and_span_ids():
    run_token = run_id_var.set("run-1")
    span_token = span_id_var.set("span-2")
    try:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
        ContextFilter().filter(record)
    finally:
        span_id_var.reset(span_token)
        run_id_var.reset(run_token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello you"
    assert line["run_id"] == "run-1" and line["span_id"] == "span-2"
    assert "request_id" not in line  # an id that is not set is left out


def test_each_request_gets_an_id_echoed_in_its_response(client, db):
    assert client.get("/login/", HTTP_X_REQUEST_ID="abc-123")["X-Request-ID"] == "abc-123"
    # Anything that does not look like an id is replaced rather than echoed.
    assert len(client.get("/login/", HTTP_X_REQUEST_ID="bad id!")["X-Request-ID"]) == 32
