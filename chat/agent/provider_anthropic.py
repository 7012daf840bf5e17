"""The Anthropic chat model, held to a whole stream (see `providers`)."""

from collections.abc import AsyncIterator
from typing import Any

from langchain_anthropic import ChatAnthropic
from langchain_anthropic.chat_models import _create_usage_metadata
from langchain_core.messages import AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk

from .providers import MESSAGE_STOP, whole_stream


def _anthropic_ends(chunk: ChatGenerationChunk) -> bool:
    return bool(chunk.message.response_metadata.get(MESSAGE_STOP))


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
            chunk = AIMessageChunk(content="", response_metadata={MESSAGE_STOP: True})
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

    def output_cap(self, max_tokens: int) -> dict[str, Any]:
        return {"max_tokens": max_tokens}
