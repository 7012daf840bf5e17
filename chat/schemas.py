"""Schemas of chat's endpoints of the JSON API."""

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from ninja import Field, Schema

from agentsite.schemas import BodyIn

from .event_schemas import ErrorData, UsageData
from .models import Conversation, Message
from .services import TITLE_MAX_CHARS

_TITLE_RULES = (
    f"Runs of whitespace become one space; at most {TITLE_MAX_CHARS} characters after that, "
    "not blank, no NUL character or unpaired surrogate (else 400 `invalid_title`)."
)


class ConversationCreateIn(BodyIn):
    title: str | None = Field(
        None,
        description="Left out: a placeholder, replaced by the start of the first message. "
        + _TITLE_RULES,
    )


class ConversationRenameIn(BodyIn):
    title: str = Field(description=_TITLE_RULES)


class ConversationOut(Schema):
    id: UUID
    title: str
    # "openai": started by the OpenAI-compatible endpoint, one per request unless bound.
    source: Conversation.Source
    created_at: datetime
    # Moves when a message is sent or answered, or the conversation renamed.
    updated_at: datetime


class ConversationPageOut(Schema):
    """Newest first (by creation). `next_cursor` is null on the last page."""

    items: list[ConversationOut]
    next_cursor: str | None


class ToolCallOut(Schema):
    tool_call_id: str
    name: str
    args: Any
    result: Any
    is_error: bool


class MessageOut(Schema):
    id: int
    role: Message.Role
    # Empty for a tool message: what the tool did is in `tool`.
    content: str
    tool: ToolCallOut | None
    # The run that wrote (or, for the user's message, was started by) the message.
    run_id: UUID | None
    # Earlier conversation an OpenAI client sent with its message: the run's input, not
    # its output, whatever the role.
    imported: bool
    created_at: datetime


class MessagePageOut(Schema):
    """Oldest first, as the conversation reads. `next_cursor` is null on the last page."""

    items: list[MessageOut]
    next_cursor: str | None


class ConversationDetailOut(ConversationOut):
    """The conversation and the first page of its messages; `GET
    /conversations/{id}/messages?cursor=` reads on from `messages.next_cursor`."""

    messages: MessagePageOut


class RunIn(BodyIn):
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
    messages: list[MessageOut]
    steps: int
    # The shapes of the run's final event: one set for the event stream and RunOut.
    usage: UsageData
    # A decimal string (exact, unlike a JSON number); null: unpriced, not free.
    cost_usd: str | None
    error: ErrorData | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
