"""The provider chat models, held to a whole stream.

langchain-openai and langchain-anthropic take a stream that simply stops (a proxy that
gave up, a server that crashed after flushing) for a finished answer: the partial text
becomes the whole answer and a tool call cut mid-arguments is parsed as if complete. A
stream counts here only with its end marker (OpenAI's `finish_reason`, Anthropic's
`message_stop`); without it the call fails as `provider_bad_response`. A stream that
ended before it carried any content is asked again (up to AGENT_PROVIDER_MAX_RETRIES
times, like the SDKs' own retries): nobody saw anything of it. Its opening chunks (role,
usage) are held back until content comes, so a retried attempt leaves nothing behind.

Each provider's model has its own module (`provider_openai`, `provider_anthropic`): only
the configured one is imported, with its SDK (the two take about 60 MiB of memory).
"""

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

from langchain_core.messages import AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk

from .errors import ProviderError

logger = logging.getLogger(__name__)


@runtime_checkable
class CapsOutput(Protocol):
    def output_cap(self, max_tokens: int) -> dict[str, Any]:
        """The call options that limit the output to `max_tokens`."""
        ...


# Marks the chunk made of Anthropic's `message_stop` event, which langchain-anthropic
# drops: it is the stream's end marker, consumed here and never part of the answer.
MESSAGE_STOP = "agentsite_message_stop"


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
            if chunk.message.response_metadata.get(MESSAGE_STOP):
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
