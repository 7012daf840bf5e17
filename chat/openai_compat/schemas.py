"""The Chat Completions request, as much of it as the agent reads. Anything else OpenAI
defines is accepted and ignored (see the package's notes), so clients that send their
usual options work unchanged."""

from typing import Any

from ninja import Schema
from pydantic import ConfigDict, Field


class ContentPart(Schema):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(Schema):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None


class StreamOptions(Schema):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionIn(Schema):
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None


class ErrorBody(Schema):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorOut(Schema):
    error: ErrorBody


class ModelOut(Schema):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelListOut(Schema):
    object: str = "list"
    data: list[ModelOut]
