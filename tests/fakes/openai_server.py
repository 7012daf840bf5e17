"""A fake OpenAI Chat Completions server: real HTTP on 127.0.0.1, scripted per test.

It speaks the wire format of `POST /v1/chat/completions` closely enough for the real
openai SDK and langchain-openai to run unchanged against it: streamed answers as
server-sent `chat.completion.chunk`s (one per token, then the finish reason, then usage
when the request asks for it with `stream_options.include_usage`, then `[DONE]`), streamed
tool calls, OpenAI-style error bodies, and plain JSON completions when `stream` is false.

Usage::

    with FakeOpenAIServer() as llm:
        settings.AGENT_OPENAI_BASE_URL = llm.base_url       # http://127.0.0.1:PORT/v1
        llm.tool_call("calculator", {"expression": "17 * 23"})
        llm.text("17 * 23 = **391**.", prompt_tokens=120, completion_tokens=9)
        ...                                                 # drive a run
        assert llm.requests[1].messages[-1]["role"] == "tool"
        llm.assert_script_used()

or as a fixture::

    @pytest.fixture
    def llm():
        with FakeOpenAIServer() as server:
            yield server
            server.assert_script_used()

Each request takes the next scripted reply (`times=n` repeats one). The script:

- `text(...)`: a streamed (or JSON) answer; `stall_after` / `drop_after` /
  `keepalive_after` make it hang, cut the connection, or send only SSE keep-alive
  comments after that many tokens; `cut_after` ends the body cleanly after that many
  pieces (tokens, then tool-argument pieces) with no finish reason, usage or `[DONE]`;
  `usage_reported=False` sends no usage chunk even when asked.
- `tool_call(...)` / `tool_calls(...)`: the model asks for tools; arguments stream in
  several pieces.
- `error(status, ...)`: an HTTP error with an OpenAI error body; 429 and 5xx carry a
  tiny `retry-after-ms` so the SDK's retries take milliseconds, not seconds.
- `stream_error(...)`: a 200 stream that starts and then carries an `{"error": ...}`
  event, as OpenAI does when something fails mid-answer.
- `malformed(...)`: a 200 whose stream carries something that is not JSON.
- `slow(...)`: nothing at all for longer than the client's timeout.
- `enqueue(reply)`: any `Reply`, e.g. `base.RawReply` for exact bytes.

A request nobody scripted gets a non-retryable 500 and lands in `unscripted`, so
`assert_script_used()` fails; every request (scripted or not) is in `requests`, with its
decoded body, so tests can check what we sent: the model, the system prompt and history
(`messages`), the tools offered (`tool_names`), and how often the SDK retried.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Self

from .base import Answer, APIError, Exchange, FakeLLMServer, split_json, split_tokens

__all__ = ["Completion", "FakeOpenAIServer", "OpenAIError", "StreamError", "ToolCall"]

_ids = itertools.count(1)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] | str  # a str is sent as is (e.g. to send invalid JSON)
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_fake{next(_ids)}"

    @property
    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments)


@dataclass
class Completion(Answer):
    """An assistant turn: text, tool calls or both, streamed when the request streams; see
    `Answer` for the text and the stream's failures."""

    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_tokens: int = 20
    completion_tokens: int | None = None  # default: the number of streamed pieces
    cached_tokens: int | None = None  # reported as prompt_tokens_details.cached_tokens
    finish_reason: str | None = None  # default: "tool_calls" if any, else "stop"

    def usage(self) -> dict[str, Any]:
        pieces = len(self.tokens) + sum(len(split_json(c.arguments_json)) for c in self.tool_calls)
        completion = self.completion_tokens if self.completion_tokens is not None else pieces
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage

    @property
    def finish(self) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")

    def send(self, exchange: Exchange) -> None:
        if exchange.request.stream:
            self._stream(exchange)
        else:
            exchange.send_json(200, self._json(exchange))

    def _json(self, exchange: Exchange) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.tokens) or None,
            "refusal": None,
        }
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json},
                }
                for call in self.tool_calls
            ]
        return {
            "id": f"chatcmpl-fake{id(self)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": _model(exchange),
            "system_fingerprint": "fp_fake",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish}
            ],
            "usage": self.usage(),
        }

    def _stream(self, exchange: Exchange) -> None:
        request = exchange.request
        envelope = {
            "id": f"chatcmpl-fake{exchange.number}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": _model(exchange),
            "system_fingerprint": "fp_fake",
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            exchange.event({**envelope, "choices": [choice]})
            if self.token_delay:
                exchange.wait(self.token_delay)

        exchange.start_stream()
        chunk({"role": "assistant", "content": "", "refusal": None})
        if not self.stream_tokens(exchange, lambda token: chunk({"content": token})):
            return
        pieces = len(self.tokens)
        for index, call in enumerate(self.tool_calls):
            head = {"index": index, "id": call.id, "type": "function"}
            chunk({"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]})
            for piece in split_json(call.arguments_json):
                delta = {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                if not self.stream_piece(exchange, pieces, lambda delta=delta: chunk(delta)):
                    return
                pieces += 1
        if self.cut_at_end(exchange, pieces):
            return
        chunk({}, self.finish)
        asked = (request.body.get("stream_options") or {}).get("include_usage")
        if asked and self.usage_reported:
            exchange.event({**envelope, "choices": [], "usage": self.usage()})
        exchange.event("[DONE]")
        exchange.end_stream()


_ERROR_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: sk-test. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


@dataclass
class OpenAIError(APIError):
    """An HTTP error with OpenAI's error body: `{"error": {message, type, param, code}}`;
    see `APIError` for `retry_after`."""

    code: str | None = None

    def body(self) -> dict[str, Any]:
        default_type, default_code, default_message = _ERROR_DEFAULTS.get(
            self.status, ("api_error", None, f"Error {self.status}.")
        )
        return {
            "error": {
                "message": self.message or default_message,
                "type": self.type or default_type,
                "param": None,
                "code": self.code or default_code,
            }
        }


@dataclass
class StreamError:
    """A 200 stream that begins an answer, then reports an error in-band."""

    message: str = "The server had an error while processing your request."
    type: str = "server_error"
    text_before: str = ""

    def send(self, exchange: Exchange) -> None:
        model = _model(exchange)
        exchange.start_stream()
        for token in split_tokens(self.text_before):
            choice = {"index": 0, "delta": {"content": token}, "finish_reason": None}
            exchange.event({"object": "chat.completion.chunk", "model": model, "choices": [choice]})
        exchange.event({"error": {"message": self.message, "type": self.type, "code": None}})
        exchange.end_stream()


class FakeOpenAIServer(FakeLLMServer):
    """A fake OpenAI Chat Completions API; see the module docstring."""

    endpoints = ("/chat/completions",)
    answer = Completion
    api_error = OpenAIError
    in_stream_error = StreamError
    malformed_body = b'data: {"id": "chatcmpl-broken", "choices": [ <html>Bad Gateway</html>\n\n'

    @property
    def base_url(self) -> str:
        """What AGENT_OPENAI_BASE_URL / the SDK's base_url should be."""
        return f"{self.url}/v1"

    def tool_call(
        self, name: str, arguments: dict[str, Any] | str, *, id: str = "", **options: Any
    ) -> Self:
        """The model asks for one tool call."""
        return self.tool_calls([ToolCall(name, arguments, id)], **options)

    def tool_calls(self, calls: list[ToolCall], *, text: str = "", **options: Any) -> Self:
        """The model asks for several tool calls at once (after optional `text`)."""
        return self.enqueue(Completion(text=text, tool_calls=calls, **options))


def _model(exchange: Exchange) -> str:
    return str(exchange.request.body.get("model") or "gpt-fake")
