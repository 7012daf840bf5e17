from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from ninja import Schema


class StepUsageOut(Schema):
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: Decimal | None
    error_type: str
    error_message: str


class SpanOut(StepUsageOut):
    id: UUID
    parent_id: UUID | None
    kind: str
    name: str
    status: str
    started_at: datetime
    ended_at: datetime
    duration_ms: float
    # Milliseconds from the trace start: where the span sits on a timeline.
    offset_ms: float
    attributes: dict[str, Any]
    children: list["SpanOut"]


class TraceOut(StepUsageOut):
    run_id: UUID
    status: str
    model: str
    started_at: datetime
    ended_at: datetime | None
    duration_ms: float | None
    span_count: int
    spans: list[SpanOut]


SpanOut.model_rebuild()
