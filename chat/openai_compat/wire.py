"""The Chat Completions wire format, both ways: a request's messages as the turns of a
run, a run's events as completions and chunks, our errors as OpenAI's."""

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from agentsite.errors import ApplicationError
from agentsite.sse import sse_message
from chat.events import Event
from chat.services import Turn

from .schemas import ChatMessage

# What OpenAI calls each kind of error (its `type`), by status.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
}
# Our codes that OpenAI clients know by another name.
_OPENAI_CODES = {"rate_limited": "rate_limit_exceeded", "budget_exceeded": "insufficient_quota"}
# Codes of our input checks (chat.services), which name the message at fault.
_MESSAGE_CODES = {"invalid_message", "empty_message", "message_too_long"}
# A response to a request that started a run: the SDKs do not retry it on their own,
# which would run the agent (and its tools) again. (They retry a timeout or a dropped
# connection all the same, never having seen this: see the Idempotency-Key.)
NO_RETRY = {"x-should-retry": "false"}


class OpenAIError(Exception):
    """An error as OpenAI words it, with its HTTP status and headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "server_error")
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def error_of(error: ApplicationError, *, prompt: "Prompt | None" = None) -> OpenAIError:
    """One of our errors, OpenAI's way: the status it has (a budget refusal, 402 in the
    rest of the API, is OpenAI's 429 `insufficient_quota`), the code clients know."""
    headers: dict[str, str] = {}
    status, type_ = error.http_status, None
    if "retry_after" in error.extra:
        headers["Retry-After"] = str(error.extra["retry_after"])
    if error.code == "budget_exceeded":
        status, type_ = 429, "insufficient_quota"
        headers.update(NO_RETRY)  # waiting seconds does not raise a budget
    param = None
    if error.code in _MESSAGE_CODES and prompt is not None:
        param = prompt.param_of(error.extra)
    return OpenAIError(
        status,
        error.message,
        code=_OPENAI_CODES.get(error.code, error.code),
        type=type_,
        param=param,
        headers=headers,
    )


# -- requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A request's messages as a run takes them: the caller's instructions (its system
    messages), the earlier turns, and the user message to answer."""

    instructions: str
    history: list[Turn]
    content: str
    # Where each turn, then the message, is in the request's `messages`.
    indexes: list[int] = field(default_factory=list)
    # Where the first system message is (its instructions' errors name it).
    instructions_index: int | None = None

    def param_of(self, where: dict[str, Any]) -> str:
        """The message an input error of `chat.services.run_create` is about."""
        if where.get("instructions"):
            index = self.instructions_index
        elif "turn" in where:
            index = self.indexes[where["turn"]]
        else:
            index = self.indexes[-1]
        return f"messages[{index}].content"


def prompt_of(messages: list[ChatMessage]) -> Prompt:
    instructions: list[str] = []
    instructions_index = None
    turns: list[tuple[int, Turn]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if message.role in ("system", "developer"):
            instructions.append(_text_of(message, where))
            instructions_index = index if instructions_index is None else instructions_index
        elif message.role in ("user", "assistant"):
            if message.tool_calls:
                raise _refused(
                    f"{where}.tool_calls",
                    "The agent's tools run on the server; a client's own tool calls "
                    "cannot be part of the history.",
                )
            role: Literal["user", "assistant"] = "user" if message.role == "user" else "assistant"
            turns.append((index, Turn(role, _text_of(message, where))))
        elif message.role in ("tool", "function"):
            raise _refused(
                f"{where}.role",
                f"Messages with role {message.role!r} are not accepted: the agent's tools "
                "run on the server, and a client's own tools cannot be offered to it.",
            )
        else:
            raise _refused(f"{where}.role", f"Unknown role {message.role!r}.")
    if not turns or turns[-1][1].role != "user":
        raise _refused(
            "messages",
            "The last message (other than system ones) must be the user's: it is the one "
            "the agent answers.",
        )
    *history, (_, last) = turns
    return Prompt(
        instructions="\n\n".join(text for text in instructions if text.strip()),
        history=[turn for _, turn in history],
        content=str(last.content),
        indexes=[index for index, _ in turns],
        instructions_index=instructions_index,
    )


def _text_of(message: ChatMessage, where: str) -> str:
    content = message.content
    if content is None:
        raise _refused(f"{where}.content", "The message has no content.")
    if isinstance(content, str):
        return content
    texts = []
    for number, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _refused(
                f"{where}.content[{number}]",
                f"Only text content is accepted, not {part.type!r}.",
            )
        texts.append(part.text)
    return "\n".join(texts)


def _refused(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, code="invalid_request", param=param)


# -- answers ----------------------------------------------------------------------------


def completion_id(run_id: UUID) -> str:
    return f"chatcmpl-{run_id.hex}"


def usage_of(final: Event) -> dict[str, int]:
    """The tokens of every model call the run made (tools make several), OpenAI's way."""
    usage = final["usage"]
    return {
        "prompt_tokens": usage["input_tokens"],
        "completion_tokens": usage["output_tokens"],
        "total_tokens": usage["total_tokens"],
    }


def finish_reason_of(final: Event) -> str:
    """How an answer ended ("stop", or "length" for a run stopped at a limit of steps or
    time, its answer cut); a run that did not answer raises its error."""
    status = final["status"]
    if status == "completed":
        return "stop"
    if status == "limit_reached":
        return "length"
    raise run_error(final)


def run_error(final: Event) -> OpenAIError:
    status = final["status"]
    error = final.get("error") or {}
    code, message = error.get("code") or status, error.get("message") or f"The run {status}."
    if status == "budget_exceeded":
        return OpenAIError(
            429,
            message,
            code="insufficient_quota",
            type="insufficient_quota",
            headers={**NO_RETRY, **_budget_retry_after(final)},
        )
    if status == "cancelled":
        return OpenAIError(409, message, code=code, headers=NO_RETRY)
    if status == "interrupted":
        return OpenAIError(503, message, code=code, headers=NO_RETRY)
    # The model provider failed (timeouts, errors, refusals: chat.agent.errors), or we did.
    http_status = 502 if code.startswith("provider_") else 500
    return OpenAIError(http_status, message, code=code, headers=NO_RETRY)


def run_gone() -> OpenAIError:
    """A run whose events ended without a final one: it was deleted (with its
    conversation) while it answered."""
    return OpenAIError(
        404,
        "The conversation was deleted while the agent answered.",
        code="conversation_not_found",
        headers=NO_RETRY,
    )


def _budget_retry_after(final: Event) -> dict[str, str]:
    """Until the exhausted budget's period starts again (UTC days and months), if the
    final event says which one it is."""
    left = (final.get("budget") or {}).get("left") or {}
    now = datetime.now(UTC)
    midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    if left.get("exhausted_month"):
        next_month = now.replace(day=28) + timedelta(days=4)
        reset = datetime(next_month.year, next_month.month, 1, tzinfo=UTC)
    elif left.get("exhausted_today"):
        reset = midnight
    else:
        return {}
    return {"Retry-After": str(int((reset - now).total_seconds()) + 1)}


def completion(
    *, run_id: UUID, created: int, model: str, content: str, final: Event
) -> dict[str, Any]:
    return {
        "id": completion_id(run_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason_of(final),
            }
        ],
        "usage": usage_of(final),
    }


@dataclass(frozen=True)
class Chunks:
    """The `chat.completion.chunk`s of one streamed answer, as SSE `data:` lines."""

    run_id: UUID
    created: int
    model: str
    include_usage: bool

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {
            "id": completion_id(self.run_id),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
            **({"usage": None} if self.include_usage else {}),
            **extra,
        }
        return sse(chunk)

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        return self._chunk(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def usage(self, final: Event) -> str:
        return self._chunk([], usage=usage_of(final))


def sse(data: dict[str, Any]) -> str:
    return sse_message(json.dumps(data))


# The end of a whole answer, as OpenAI marks it.
DONE = sse_message("[DONE]")
