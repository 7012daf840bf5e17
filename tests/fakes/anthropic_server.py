"""A fake Anthropic Messages API server: real HTTP on 127.0.0.1, scripted per test.

It speaks the wire format of `POST /v1/messages` closely enough for the real anthropic
SDK and langchain-anthropic to run unchanged against it: streamed answers as server-sent
events (`message_start`, `content_block_start`, `ping`, `content_block_delta` with
`text_delta` / `input_json_delta`, `content_block_stop`, `message_delta` with the stop
reason and usage, `message_stop`), Anthropic-style error bodies, in-stream `error`
events, and plain JSON messages when `stream` is false.

Usage::

    with FakeAnthropicServer() as llm:
        settings.AGENT_ANTHROPIC_BASE_URL = llm.base_url    # http://127.0.0.1:PORT
        llm.tool_use("calculator", {"expression": "17 * 23"})
        llm.text("17 * 23 = **391**.", input_tokens=120, output_tokens=9)
        ...                                                 # drive a run
        assert llm.requests[1].messages[-1]["content"][0]["type"] == "tool_result"
        llm.assert_script_used()

The scripting and inspection API is the one of `FakeOpenAIServer` (see
`tests/fakes/openai_server.py` and `tests/fakes/base.py`): each request takes the next
scripted reply, `times=n` repeats one, every request is recorded in `requests`.
Note that Anthropic sends the system prompt in the body's `system`, not in `messages`.
Besides the options of `Answer` (`cut_after`, `usage_reported`, ...), a `Message` can
leave the input tokens out of `message_delta` (`input_in_message_delta=False`, as the
real API may) or end without `message_stop` (`message_stop=False`).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Self

from .base import Answer, APIError, Exchange, FakeLLMServer, split_json, split_tokens

__all__ = ["AnthropicError", "FakeAnthropicServer", "Message", "StreamError", "ToolUse"]

_ids = itertools.count(1)


@dataclass
class ToolUse:
    name: str
    input: dict[str, Any] | str  # a str is streamed as is (e.g. to send invalid JSON)
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"toolu_fake{next(_ids):04d}"


@dataclass
class Message(Answer):
    """An assistant turn: text, tool uses or both, streamed when the request streams; see
    `Answer` for the text and the stream's failures."""

    tool_uses: list[ToolUse] = field(default_factory=list)
    input_tokens: int = 20
    output_tokens: int | None = None  # default: the number of streamed pieces
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    stop_reason: str | None = None  # default: "tool_use" if any, else "end_turn"
    # False: `message_delta` reports only output tokens, as the real API may; the input
    # was reported in `message_start`.
    input_in_message_delta: bool = True
    # False: the stream ends after `message_delta`, without `message_stop`.
    message_stop: bool = True

    @property
    def stop(self) -> str:
        return self.stop_reason or ("tool_use" if self.tool_uses else "end_turn")

    def usage(self) -> dict[str, Any]:
        pieces = len(self.tokens) + sum(
            len(split_json(_json(tool.input))) for tool in self.tool_uses
        )
        if not self.usage_reported:  # a server that counts nothing
            return {"input_tokens": 0, "output_tokens": 0}
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": self.output_tokens if self.output_tokens is not None else pieces,
        }

    def delta_usage(self) -> dict[str, Any]:
        usage = self.usage()
        if self.input_in_message_delta:
            return usage
        return {"output_tokens": usage["output_tokens"]}

    def _content(self) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if self.tokens:
            blocks.append({"type": "text", "text": "".join(self.tokens)})
        blocks.extend(
            {"type": "tool_use", "id": tool.id, "name": tool.name, "input": _input(tool)}
            for tool in self.tool_uses
        )
        return blocks

    def send(self, exchange: Exchange) -> None:
        request = exchange.request
        message = {
            "id": f"msg_fake{exchange.number:04d}",
            "type": "message",
            "role": "assistant",
            "model": _model(exchange),
            "stop_sequence": None,
        }
        if not request.stream:
            exchange.send_json(
                200,
                {
                    **message,
                    "content": self._content(),
                    "stop_reason": self.stop,
                    "usage": self.usage(),
                },
            )
            return

        def event(name: str, data: dict[str, Any]) -> None:
            exchange.event({"type": name, **data}, event=name)
            if self.token_delay:
                exchange.wait(self.token_delay)

        exchange.start_stream()
        start_usage = {**self.usage(), "output_tokens": 1}
        event(
            "message_start",
            {"message": {**message, "content": [], "stop_reason": None, "usage": start_usage}},
        )
        index = 0
        if self.tokens:
            event(
                "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
            )
            event("ping", {})

            def text_delta(token: str) -> None:
                delta = {"type": "text_delta", "text": token}
                event("content_block_delta", {"index": 0, "delta": delta})

            if not self.stream_tokens(exchange, text_delta):
                return
            event("content_block_stop", {"index": 0})
            index = 1
        pieces = len(self.tokens)
        for tool in self.tool_uses:
            block = {"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}}
            event("content_block_start", {"index": index, "content_block": block})
            for piece in split_json(_json(tool.input)):
                delta = {
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": piece},
                }
                if not self.stream_piece(
                    exchange, pieces, lambda delta=delta: event("content_block_delta", delta)
                ):
                    return
                pieces += 1
            event("content_block_stop", {"index": index})
            index += 1
        if self.cut_at_end(exchange, pieces):
            return
        event(
            "message_delta",
            {
                "delta": {"stop_reason": self.stop, "stop_sequence": None},
                "usage": self.delta_usage(),
            },
        )
        if self.message_stop:
            event("message_stop", {})
        exchange.end_stream()


_ERROR_TYPES = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "model: claude-fake"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def _error_body(status: int, message: str | None, error_type: str | None) -> dict[str, Any]:
    default_type, default_message = _ERROR_TYPES.get(status, ("api_error", f"Error {status}."))
    return {
        "type": "error",
        "error": {"type": error_type or default_type, "message": message or default_message},
        "request_id": f"req_fake{int(time.time())}",
    }


@dataclass
class AnthropicError(APIError):
    """An HTTP error with Anthropic's error body: `{"type": "error", "error": {...}}`; see
    `APIError` for `retry_after` (529 "overloaded" counts as a 5xx)."""

    def body(self) -> dict[str, Any]:
        return _error_body(self.status, self.message, self.type)


@dataclass
class StreamError:
    """A 200 stream that begins an answer, then sends an `error` event (Anthropic does
    this e.g. when it becomes overloaded mid-answer)."""

    message: str = "Overloaded"
    type: str = "overloaded_error"
    text_before: str = ""

    def send(self, exchange: Exchange) -> None:
        model = _model(exchange)
        exchange.start_stream()
        message = {
            "id": f"msg_fake{exchange.number:04d}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 20, "output_tokens": 1},
        }
        exchange.event({"type": "message_start", "message": message}, event="message_start")
        if self.text_before:
            start = {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
            exchange.event(start, event="content_block_start")
            for token in split_tokens(self.text_before):
                delta = {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": token},
                }
                exchange.event(delta, event="content_block_delta")
        exchange.event(_error_body(529, self.message, self.type), event="error")
        exchange.end_stream()


class FakeAnthropicServer(FakeLLMServer):
    """A fake Anthropic Messages API; see the module docstring. Its `base_url` is the
    server's root: the SDK adds /v1 itself."""

    endpoints = ("/v1/messages",)
    answer = Message
    api_error = AnthropicError
    in_stream_error = StreamError
    malformed_body = b'event: message_start\ndata: {"type": "message_start", <html>Bad Gateway\n\n'

    def tool_use(
        self, name: str, input: dict[str, Any] | str, *, id: str = "", **options: Any
    ) -> Self:
        """The model asks for one tool call."""
        return self.tool_uses([ToolUse(name, input, id)], **options)

    def tool_uses(self, tools: list[ToolUse], *, text: str = "", **options: Any) -> Self:
        """The model asks for several tool calls at once (after optional `text`)."""
        return self.enqueue(Message(text=text, tool_uses=tools, **options))


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _input(tool: ToolUse) -> Any:
    if not isinstance(tool.input, str):
        return tool.input
    try:
        return json.loads(tool.input)
    except ValueError:
        return {}


def _model(exchange: Exchange) -> str:
    return str(exchange.request.body.get("model") or "claude-fake")
