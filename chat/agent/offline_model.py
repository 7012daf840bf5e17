"""The built-in offline model: deterministic, no network, clearly a demo.

It really drives the agent loop: arithmetic becomes a `calculator` call, questions about
the time or date become a `current_time` call, and tool results become an answer. It
streams token by token with a configurable delay so it can stand in for a slow real
model in load tests, and it reports token usage like a real provider.
"""

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from .tools import time_zone_for

OFFLINE_MODEL_NAME = "agentsite-offline-demo"

# A run of numbers joined by at least one operator, e.g. "17 * 23" or "(2+3)^2".
_ARITHMETIC = re.compile(
    r"[-(]*\s*\d[\d.]*(?:\s*[-+*/×÷^%]+\s*[-(]*\s*\d[\d.]*\s*\)*)+|sqrt\(\s*[\d.]+\s*\)"
)
_TIME_WORDS = re.compile(r"\b(time|date|day|today|clock|o'clock)\b", re.IGNORECASE)
_ZONE = re.compile(r"\b(UTC|[A-Z][A-Za-z_]+/[A-Z][A-Za-z_]+(?:/[A-Z][A-Za-z_]+)?)\b")
# The words after "in": "in Tokyo", "in New York right now", "in Europe/Paris".
_PLACE = re.compile(r"\bin\s+([A-Za-z][\w'/-]*(?:\s+[A-Za-z][\w'/-]*){0,3})", re.IGNORECASE)
_TOKEN = re.compile(r"\s*\S+|\s+")
MAX_PARALLEL_CALLS = 5

INTRO = (
    "I am the **offline demo model** built into Agentsite: I run without a network and "
    "answer deterministically. I can really use two tools — try *What is 17 * 23?* or "
    "*What time is it in Tokyo?* — and otherwise I repeat what you wrote:\n\n"
)


class OfflineChatModel(BaseChatModel):
    """A deterministic chat model that needs no network and no key."""

    token_delay: float = 0.0
    model_name: str = OFFLINE_MODEL_NAME

    @property
    def _llm_type(self) -> str:
        return "agentsite-offline"

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Any | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks = list(self._chunks(messages, kwargs.get("tools") or [], kwargs.get("max_tokens")))
        merged = chunks[0]
        for chunk in chunks[1:]:
            merged += chunk
        message = AIMessage(
            content=merged.content,
            tool_calls=merged.tool_calls,
            usage_metadata=merged.usage_metadata,
            response_metadata=merged.response_metadata,
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, kwargs.get("tools") or [], kwargs.get("max_tokens")):
            yield ChatGenerationChunk(message=chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        chunks = self._chunks(messages, kwargs.get("tools") or [], kwargs.get("max_tokens"))
        for index, chunk in enumerate(chunks):
            if index and self.token_delay:
                await asyncio.sleep(self.token_delay)
            generation = ChatGenerationChunk(message=chunk)
            if run_manager and isinstance(chunk.content, str) and chunk.content:
                await run_manager.on_llm_new_token(chunk.content, chunk=generation)
            yield generation

    def _chunks(
        self, messages: list[BaseMessage], tools: list[dict[str, Any]], max_tokens: int | None
    ) -> Iterator[AIMessageChunk]:
        """The reply, cut at `max_tokens` of output like a real model's (finish reason
        "length"); tool calls that do not fit are not made (the reply is then empty)."""
        available = {t["function"]["name"] for t in tools}
        calls = _plan_tool_calls(messages, available)
        output_tokens = 0
        finish = "stop"
        calls_tokens = sum(1 + len(json.dumps(args)) // 4 for _, args in calls)
        if calls and max_tokens is not None and calls_tokens > max_tokens:
            finish = "length"  # the calls do not fit: none is made
        elif calls:
            output_tokens = calls_tokens
            yield AIMessageChunk(
                content="",
                tool_call_chunks=[
                    {
                        "name": name,
                        "args": json.dumps(args),
                        "id": f"call_offline_{len(messages)}" + (f"_{index}" if index else ""),
                        "index": index,
                    }
                    for index, (name, args) in enumerate(calls)
                ],
            )
        else:
            for token in _TOKEN.findall(_reply(messages)):
                if output_tokens == max_tokens:
                    finish = "length"
                    break
                output_tokens += 1
                yield AIMessageChunk(content=token)
        input_tokens = count_tokens_approximately(messages)
        yield AIMessageChunk(
            content="",
            usage_metadata={
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
            response_metadata={"model_name": self.model_name, "finish_reason": finish},
            chunk_position="last",
        )


def _plan_tool_calls(
    messages: list[BaseMessage], available: set[str]
) -> list[tuple[str, dict[str, Any]]]:
    """Call tools only when answering a person, never right after a tool result, so
    the loop always ends. Several expressions ("2*3 and 4*5") become several calculator
    calls in one message, as a real model would make them in parallel."""
    if not messages or not isinstance(messages[-1], HumanMessage):
        return []
    text = messages[-1].text
    expressions = [m.group(0).strip() for m in _ARITHMETIC.finditer(text)][:MAX_PARALLEL_CALLS]
    if expressions and "calculator" in available:
        return [("calculator", {"expression": expression}) for expression in expressions]
    if _TIME_WORDS.search(text) and "current_time" in available:
        place = _place_in(text)
        return [("current_time", {"timezone": place} if place else {})]
    return []


def _place_in(text: str) -> str | None:
    """The place a question asks the time of, as a person wrote it; one the tool will not
    know is passed on all the same, so the answer says so instead of giving UTC."""
    zone = _ZONE.search(text)
    if zone:
        return zone.group(1)
    found = _PLACE.search(text)
    if found is None:
        return None
    words = found.group(1).split()
    # "New York right now": the longest run of leading words that names a place.
    for count in range(len(words), 0, -1):
        if time_zone_for(" ".join(words[:count])):
            return " ".join(words[:count])
    return found.group(1)


def _reply(messages: list[BaseMessage]) -> str:
    results = _latest_tool_results(messages)
    if results:
        calls = _calls_before(messages, len(messages) - len(results))
        return "\n\n".join(_describe_result(m, calls.get(m.tool_call_id, {})) for m in results)
    last_human = next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)
    said = last_human.text if last_human else ""
    quoted = "\n".join(f"> {line}" for line in said.splitlines()) or "> (nothing)"
    return INTRO + quoted


def _latest_tool_results(messages: list[BaseMessage]) -> list[ToolMessage]:
    results: list[ToolMessage] = []
    for message in reversed(messages):
        if not isinstance(message, ToolMessage):
            break
        results.insert(0, message)
    return results


def _calls_before(messages: list[BaseMessage], index: int) -> dict[str, dict[str, Any]]:
    caller = messages[index - 1] if index > 0 else None
    if not isinstance(caller, AIMessage):
        return {}
    return {call["id"] or "": call["args"] for call in caller.tool_calls}


def _describe_result(message: ToolMessage, args: dict[str, Any]) -> str:
    if message.status == "error":
        return f"The `{message.name}` tool could not do that: {message.text}"
    if message.name == "calculator":
        expression = args.get("expression", "that")
        return f"`{expression}` = **{message.text}** (worked out with the calculator tool)."
    if message.name == "current_time":
        return f"It is now **{message.text}**."
    return f"`{message.name}` returned: {message.text}"
