"""The graph's stream, translated once into the run's typed steps (`chat.run_outcome`),
and each step's event as the run emits it. The outcome the run stores is the sum of the
same steps, so nothing is interpreted twice."""

from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any, Literal

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage

from chat.run_outcome import (
    RunStep,
    StepLimitReached,
    StepsCounted,
    TextStreamed,
    ToolFinished,
    ToolStarted,
    UsageReported,
)

from .budget import usage_of
from .graph import is_step_limit_explanation
from .replies import rejected_arguments

# The stream modes `translate` reads; LangGraph yields (mode, data) pairs with several.
STREAM_MODES: list[Literal["messages", "updates"]] = ["messages", "updates"]


def translate(mode: str, data: Any) -> Iterator[RunStep]:
    """The steps in one (mode, data) part of the graph's stream."""
    if mode == "messages":
        chunk, metadata = data
        node = metadata.get("langgraph_node")
        if node == "call_model" and isinstance(chunk, AIMessageChunk) and chunk.text:
            yield TextStreamed(chunk.text)
        return
    for node, update in data.items():
        yield from _node_update(node, update or {})


def _node_update(node: str, update: dict[str, Any]) -> Iterator[RunStep]:
    messages = update.get("messages", [])
    if node == "call_model":
        if "steps" in update:
            yield StepsCounted(update["steps"])
        for message in messages:
            if isinstance(message, AIMessage):
                yield from _model_reply(message)
        return
    # A tool call's result: from the tools, or an error answering a call that never ran
    # (its arguments unusable, or the step limit reached): all shown alike.
    for message in messages:
        if isinstance(message, ToolMessage):
            yield _tool_finished(message)
    if node == "stop_at_step_limit":
        explanation = next(m for m in messages if isinstance(m, AIMessage))
        yield StepLimitReached(explanation.text)


def steps_of_messages(messages: Iterable[BaseMessage]) -> Iterator[RunStep]:
    """The steps that produced these checkpointed messages, in order (a resumed run's
    output so far): each reply's text and tool calls, each tool's result, and the step
    limit's explanation as the limit reached. Not their usage: a resumed run's totals
    are the ledger's."""
    for message in messages:
        if is_step_limit_explanation(message):
            yield StepLimitReached(message.text)
        elif isinstance(message, AIMessage):
            if message.text:
                yield TextStreamed(message.text)
            yield from (s for s in _model_reply(message) if not isinstance(s, UsageReported))
        elif isinstance(message, ToolMessage):
            yield _tool_finished(message)


def _tool_finished(message: ToolMessage) -> ToolFinished:
    return ToolFinished(
        tool_call_id=message.tool_call_id,
        name=message.name or "",
        result=message.text,
        is_error=message.status == "error",
    )


def _model_reply(message: AIMessage) -> Iterator[RunStep]:
    if message.usage_metadata:
        usage = usage_of(message)
        yield UsageReported(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_tokens,
        )
    for call in message.tool_calls:
        yield ToolStarted(tool_call_id=call["id"] or "", name=call["name"], args=call["args"])
    # Calls whose arguments were unusable are shown too, with the arguments as sent (a
    # string): the user sees what the model tried and, when it finishes, why it never ran.
    for invalid in message.invalid_tool_calls:
        yield ToolStarted(
            tool_call_id=invalid.get("id") or "",
            name=invalid.get("name") or "",
            args=rejected_arguments(message, invalid),
        )


def event_of(step: RunStep) -> tuple[str, dict[str, Any]] | None:
    """The event a step is emitted as (type and data); None for a step not shown."""
    match step:
        case TextStreamed(text=text) | StepLimitReached(explanation=text):
            return "token", {"text": text}
        case UsageReported():
            return "usage", {
                "input_tokens": step.input_tokens,
                "output_tokens": step.output_tokens,
                "total_tokens": step.input_tokens + step.output_tokens,
            }
        case ToolStarted():
            return "tool.started", asdict(step)
        case ToolFinished():
            return "tool.finished", asdict(step)
    return None
