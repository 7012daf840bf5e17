"""Structured logs: one JSON object per line when DEBUG is off, carrying the request id
and run id of whatever the line was logged for and, while a span of the run's trace is
current, its `trace_id` and `span_id` as OpenTelemetry writes them (32 and 16 hex
digits), so a line leads to its span in any OpenTelemetry viewer the trace went to.

A plain `logging.Formatter` subclass rather than structlog: every library in the process
(Django, Channels, LangChain, httpx) logs through stdlib logging, and this is all it
takes to make those lines structured too, with no second logging pipeline to configure.
"""

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from .otel import otel_hex_ids

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
run_id_var: ContextVar[str | None] = ContextVar("run_id", default=None)
# The UUID of the current span of the run's trace (tracing sets it).
span_id_var: ContextVar[str | None] = ContextVar("span_id", default=None)

_IDS = ("request_id", "run_id", "trace_id", "span_id")
# Attributes every LogRecord has, and the ids (written above the rest, and only when
# set); anything else was passed with `extra=` and is kept.
_SKIP = {*vars(logging.LogRecord("", 0, "", 0, "", None, None)), "message", "asctime", *_IDS}


class ContextFilter(logging.Filter):
    """Copies the ids from the context variables onto the record, for any formatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.run_id = run_id = run_id_var.get()
        record.trace_id = record.span_id = None
        span_id = span_id_var.get()
        if run_id and span_id:
            # Worked out here, for the lines actually logged, not whenever a span starts.
            record.trace_id, record.span_id = otel_hex_ids(run_id=run_id, span_id=span_id)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _IDS:
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        for key, value in vars(record).items():
            if key not in _SKIP and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)
