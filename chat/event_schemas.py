"""The events a run emits, as typed schemas: what the WebSocket, Server-Sent Events and
the OpenAPI schema carry. Data only: text, numbers, ids. How the chat page draws them
(Markdown as HTML, costs and the budget line worded) is `chat.presentation`'s.

Every event has `type`, `run` (its id) and `seq` (1, 2, … per run, no gaps in what the
run emitted; a client resumes after the last one it saw), but for `run.resumed`, whose
seq may jump past a gap. A run ends with exactly one final event (`run.completed`,
`run.failed`, …), the last of its events.

The events are built where the run emits them (`chat.agent.runner`, the translator's
`event_of`, `chat.lifecycle._final_event`); `chat/tests/test_event_schemas.py` holds
every event of real runs to these schemas, so the two cannot drift apart."""

from typing import Annotated, Any, Literal, get_args
from uuid import UUID

from ninja import Field, Schema
from pydantic import ConfigDict, TypeAdapter


class _Strict(Schema):
    # An event that gains a field must gain it here too (and so in the API's docs).
    model_config = ConfigDict(extra="forbid")


class _EventBase(_Strict):
    run: UUID
    seq: int = Field(..., ge=1)


class MessageData(_Strict):
    """A stored message: its id and its text (Markdown, as the model wrote it)."""

    id: int
    content: str


class UsageData(_Strict):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class ErrorData(_Strict):
    code: str
    message: str


# [remaining, limit]
UsdPair = Annotated[list[str], Field(min_length=2, max_length=2)]
TokenPair = Annotated[list[int], Field(min_length=2, max_length=2)]


class BudgetLeftData(_Strict):
    """What is left of each of the account's limits as [remaining, limit], null where it
    has no such limit; money as decimal strings. `exhausted_*`: the next message will
    be refused until that period resets."""

    day_usd: UsdPair | None
    month_usd: UsdPair | None
    tokens_today: TokenPair | None
    exhausted_today: bool
    exhausted_month: bool


class BudgetData(_Strict):
    """`left`: null when the account has no limits."""

    left: BudgetLeftData | None


class RunStartedEvent(_EventBase):
    type: Literal["run.started"]
    model: str
    conversation_title: str
    user_message: MessageData | None


class RunResumedEvent(_EventBase):
    """The first event of a run resumed from its last checkpoint after the process
    executing it died or handed it back: its seq is past any its earlier execution may
    have used (a gap, not lost events). What the step that was cut had streamed is not
    part of the answer (drop it); everything before it is. `recoveries`: how many times
    the run has been resumed."""

    type: Literal["run.resumed"]
    recoveries: int = Field(..., ge=1)


RESUMED_EVENT_TYPE = "run.resumed"


class TokenEvent(_EventBase):
    """A piece of the answer as it streams (or the explanation a step limit ends it with)."""

    type: Literal["token"]
    text: str


class ToolStartedEvent(_EventBase):
    """`args`: the call's arguments; for a call that never ran because they were
    unusable, the text the model sent."""

    type: Literal["tool.started"]
    tool_call_id: str
    name: str
    args: dict[str, Any] | str


class ToolFinishedEvent(_EventBase):
    type: Literal["tool.finished"]
    tool_call_id: str
    name: str
    result: str
    is_error: bool


class UsageEvent(_EventBase):
    """One model call's tokens, as its provider reported them."""

    type: Literal["usage"]
    input_tokens: int
    output_tokens: int
    total_tokens: int


class _FinalBase(_EventBase):
    """The run's last event: how it ended, what it stored and what it cost."""

    messages: list[MessageData]
    usage: UsageData
    cost_usd: str | None = Field(
        ..., description="A decimal string; null when a call was unpriced (not free)."
    )
    error: ErrorData | None = Field(None, description="Absent when the run succeeded.")
    # Optional: the account's usage and limits are what an API key's `usage` scope
    # guards, so the API leaves this out for a key without it (`chat.runs_api`).
    budget: BudgetData | None = Field(
        None,
        description="What the account has left after the run; null: not known. Absent "
        "for an API key without the `usage` scope.",
    )


class RunCompletedEvent(_FinalBase):
    type: Literal["run.completed"]
    status: Literal["completed"]


class RunFailedEvent(_FinalBase):
    type: Literal["run.failed"]
    status: Literal["failed"]


class RunCancelledEvent(_FinalBase):
    type: Literal["run.cancelled"]
    status: Literal["cancelled"]


class RunLimitReachedEvent(_FinalBase):
    type: Literal["run.limit_reached"]
    status: Literal["limit_reached"]


class RunBudgetExceededEvent(_FinalBase):
    type: Literal["run.budget_exceeded"]
    status: Literal["budget_exceeded"]


class RunInterruptedEvent(_FinalBase):
    type: Literal["run.interrupted"]
    status: Literal["interrupted"]


RunEvent = Annotated[
    RunStartedEvent
    | RunResumedEvent
    | TokenEvent
    | ToolStartedEvent
    | ToolFinishedEvent
    | UsageEvent
    | RunCompletedEvent
    | RunFailedEvent
    | RunCancelledEvent
    | RunLimitReachedEvent
    | RunBudgetExceededEvent
    | RunInterruptedEvent,
    Field(discriminator="type"),
]

run_event_adapter: TypeAdapter[RunEvent] = TypeAdapter(RunEvent)

FINAL_EVENT_TYPES = frozenset(
    get_args(event.model_fields["type"].annotation)[0]
    for event in (
        RunCompletedEvent,
        RunFailedEvent,
        RunCancelledEvent,
        RunLimitReachedEvent,
        RunBudgetExceededEvent,
        RunInterruptedEvent,
    )
)
