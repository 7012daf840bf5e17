"""Schemas of chat's endpoints of the JSON API."""

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from ninja import Field, Schema


class RunIn(Schema):
    message: str = Field(description="The user's message: what the agent answers.")
    mode: Literal["wait", "stream", "background"] = Field(
        "wait",
        description=(
            "`wait` (the default): answer when the run is over, with the finished run. "
            "`stream`: Server-Sent Events of the run as it happens (`id:` is the event's "
            "seq, for `Last-Event-ID`), ending after its final event. `background`: 202 "
            "at once, with the run and its URL in `Location`."
        ),
    )


class UsageOut(Schema):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class RunErrorOut(Schema):
    code: str
    message: str


class RunMessageOut(Schema):
    id: int
    role: Literal["user", "assistant", "tool"]
    content: str
    # Tool messages: {"tool_call_id", "name", "args", "result", "is_error"}.
    tool: dict[str, Any] | None
    # Earlier conversation its caller sent with the message (the OpenAI-compatible
    # endpoint): the run's input, not its output, whatever the role.
    imported: bool
    created_at: datetime


class RunOut(Schema):
    id: UUID
    conversation: UUID
    status: Literal[
        "queued",
        "running",
        "completed",
        "failed",
        "cancelled",
        "limit_reached",
        "budget_exceeded",
        "interrupted",
    ]
    model: str
    # The agent's answer: its text messages, joined; null if it wrote none (yet).
    answer: str | None
    # The run's messages: the user's, then the agent's and its tool calls, in order.
    messages: list[RunMessageOut]
    steps: int
    usage: UsageOut
    # A decimal string (exact, unlike a JSON number); null: unpriced, not free.
    cost_usd: str | None
    error: RunErrorOut | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
