"""The provider chat models, held to a whole stream.

langchain-openai and langchain-anthropic take a stream that simply stops (a proxy that
gave up, a server that crashed after flushing) for a finished answer: the partial text
becomes the whole answer and a tool call cut mid-arguments is parsed as if complete. A
stream counts here only with its end marker (OpenAI's `finish_reason`, Anthropic's
`message_stop`); without it the call fails as `provider_bad_response`. A stream that
ended before it carried any content is asked again (up to AGENT_PROVIDER_MAX_RETRIES
times, like the SDKs' own retries): nobody saw anything of it. Its opening chunks (role,
usage) are held back until content comes, so a retried attempt leaves nothing behind.
"""

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from langchain_anthropic import ChatAnthropic
from langchain_anthropic.chat_models import _create_usage_metadata
from langchain_core.messages import AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk
from langchain_openai import ChatOpenAI

from .errors import ProviderError

logger = logging.getLogger(__name__)

# Marks the chunk made of Anthropic's `message_stop` event, which langchain-anthropic
# drops: it is the stream's end marker, consumed here and never part of the answer.
_MESSAGE_STOP = "agentsite_message_stop"


class IncompleteStream(ProviderError):
    def __init__(self, *, streamed: bool) -> None:
        if streamed:
            message = (
                "The model provider's stream stopped before the end of its answer (no end "
                "marker): what came is kept, but the answer is incomplete and no tool it "
                "asked for was run."
            )
        else:
            message = (
                "The model provider's stream stopped before the end of its answer (no end "
                "marker) before any content, every time it was asked."
            )
        super().__init__("provider_bad_response", message)


async def whole_stream(
    attempt: Callable[[], AsyncIterator[ChatGenerationChunk]],
    *,
    ends_stream: Callable[[ChatGenerationChunk], bool],
    retries: int,
) -> AsyncIterator[ChatGenerationChunk]:
    """The chunks of `attempt()`, which must end with a chunk that `ends_stream`; see the
    module docstring."""
    for number in range(retries + 1):
        held: list[ChatGenerationChunk] = []
        streamed = ended = False
        async for chunk in attempt():
            if ends_stream(chunk):
                ended = True
            if chunk.message.response_metadata.get(_MESSAGE_STOP):
                continue
            if streamed:
                yield chunk
                continue
            held.append(chunk)
            if _has_content(chunk.message):
                streamed = True
                for each in held:
                    yield each
                held = []
        if ended:
            for each in held:  # an empty answer: still an answer
                yield each
            return
        if streamed:
            raise IncompleteStream(streamed=True)
        logger.warning("provider stream ended before any content (attempt %d)", number + 1)
    raise IncompleteStream(streamed=False)


def _has_content(message: Any) -> bool:
    return bool(isinstance(message, AIMessageChunk) and (message.text or message.tool_call_chunks))


def _openai_ends(chunk: ChatGenerationChunk) -> bool:
    return bool(
        (chunk.generation_info or {}).get("finish_reason")
        or chunk.message.response_metadata.get("finish_reason")
    )


def _anthropic_ends(chunk: ChatGenerationChunk) -> bool:
    return bool(chunk.message.response_metadata.get(_MESSAGE_STOP))


class OpenAIChatModel(ChatOpenAI):
    async def _astream(self, *args: Any, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        def attempt() -> AsyncIterator[ChatGenerationChunk]:
            return super(OpenAIChatModel, self)._astream(*args, **kwargs)

        async for chunk in whole_stream(
            attempt, ends_stream=_openai_ends, retries=self.max_retries or 0
        ):
            yield chunk


class AnthropicChatModel(ChatAnthropic):
    """Also counts the input tokens as `message_start` reports them: langchain-anthropic
    reads them from `message_delta` only, which the API may leave without them."""

    async def _astream(self, *args: Any, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        def attempt() -> AsyncIterator[ChatGenerationChunk]:
            return super(AnthropicChatModel, self)._astream(*args, **kwargs)

        async for chunk in whole_stream(
            attempt, ends_stream=_anthropic_ends, retries=self.max_retries
        ):
            yield chunk

    def _make_message_chunk_from_anthropic_event(
        self, event: Any, **kwargs: Any
    ) -> tuple[AIMessageChunk | None, Any]:
        chunk, block_start = super()._make_message_chunk_from_anthropic_event(event, **kwargs)
        if event.type == "message_stop":
            chunk = AIMessageChunk(content="", response_metadata={_MESSAGE_STOP: True})
        elif event.type == "message_start" and chunk is not None and kwargs.get("stream_usage"):
            # Input from message_start, output from message_delta: the API's documented
            # split. (message_delta may repeat the input as a running total; counting it
            # again would double it.)
            usage = _create_usage_metadata(event.message.usage)
            chunk.usage_metadata = {
                "input_tokens": usage["input_tokens"],
                "output_tokens": 0,
                "total_tokens": usage["input_tokens"],
                "input_token_details": usage.get("input_token_details", {}),
            }
        elif event.type == "message_delta" and chunk is not None and chunk.usage_metadata:
            output = chunk.usage_metadata["output_tokens"]
            chunk.usage_metadata = {
                "input_tokens": 0,
                "output_tokens": output,
                "total_tokens": output,
            }
        return chunk, block_start
