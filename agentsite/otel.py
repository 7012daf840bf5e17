"""How our ids appear in OpenTelemetry: a run's trace id is the run id, a span's id the
low 64 bits of its UUID. In one place, so the exported spans and the log lines that
point at them always agree."""

from uuid import UUID


def otel_span_id(span_id: UUID) -> int:
    # 0 is OpenTelemetry's "no span"; a UUID whose low half is 0 is all but impossible.
    return (span_id.int & 0xFFFF_FFFF_FFFF_FFFF) or 1


def otel_hex_ids(*, run_id: str, span_id: str) -> tuple[str, str]:
    """The trace id and span id as OpenTelemetry writes them: 32 and 16 hex digits."""
    return UUID(run_id).hex, format(otel_span_id(UUID(span_id)), "016x")
