"""The OpenAI (or OpenAI-compatible) chat model, held to a whole stream (see `providers`)."""

from collections.abc import AsyncIterator
from typing import Any

from langchain_core.outputs import ChatGenerationChunk
from langchain_openai import ChatOpenAI

from .providers import whole_stream


def _openai_ends(chunk: ChatGenerationChunk) -> bool:
    return bool(
        (chunk.generation_info or {}).get("finish_reason")
        or chunk.message.response_metadata.get("finish_reason")
    )


class OpenAIChatModel(ChatOpenAI):
    async def _astream(self, *args: Any, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        def attempt() -> AsyncIterator[ChatGenerationChunk]:
            return super(OpenAIChatModel, self)._astream(*args, **kwargs)

        async for chunk in whole_stream(
            attempt, ends_stream=_openai_ends, retries=self.max_retries or 0
        ):
            yield chunk

    def output_cap(self, max_tokens: int) -> dict[str, Any]:
        # langchain-openai sends it as max_completion_tokens; the extra body, where the
        # model has one, repeats it as max_tokens for compatible servers (see
        # models._openai).
        if self.extra_body is None:
            return {"max_tokens": max_tokens}
        return {
            "max_tokens": max_tokens,
            "extra_body": {**self.extra_body, "max_tokens": max_tokens},
        }
