"""Preparing the stored conversation for a model call."""

from typing import cast

from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    HumanMessage,
    InvalidToolCall,
    ToolCall,
    ToolMessage,
)
from langchain_core.messages.utils import count_tokens_approximately, trim_messages

from .prompts import TOOL_SKIPPED_MESSAGE


def close_dangling_tool_calls(messages: list[AnyMessage]) -> list[AnyMessage]:
    """A run cancelled between a tool call and its result leaves the call unanswered in
    the checkpoint; providers reject such a history, so answer it with a placeholder."""
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    repaired: list[AnyMessage] = []
    for message in messages:
        repaired.append(message)
        if isinstance(message, AIMessage):
            repaired.extend(
                skipped_tool_result(call)
                for call in message.tool_calls
                if call["id"] not in answered
            )
            # Sent to the provider as calls too (from checkpoints made before they
            # were answered): they need a result as much.
            repaired.extend(
                skipped_tool_result(call)
                for call in message.invalid_tool_calls
                if call["id"] and call["id"] not in answered
            )
    return repaired


def skipped_tool_result(call: ToolCall | InvalidToolCall) -> ToolMessage:
    """The answer to a tool call that will never run."""
    return ToolMessage(
        content=TOOL_SKIPPED_MESSAGE,
        tool_call_id=call["id"] or "",
        name=call["name"] or "",
        status="error",
    )


def fit_to_budget(messages: list[AnyMessage], max_tokens: int) -> list[AnyMessage]:
    """Keep the most recent messages that fit in `max_tokens`, starting on a human turn
    so a tool result is never separated from the call that asked for it."""
    history = close_dangling_tool_calls(messages)
    trimmed = trim_messages(
        history,
        max_tokens=max_tokens,
        token_counter=count_tokens_approximately,
        strategy="last",
        start_on="human",
        allow_partial=False,
    )
    if trimmed:
        return cast(list[AnyMessage], trimmed)
    # Even the latest turn is over budget: send the latest human message alone rather
    # than nothing; the provider reports a context overflow if it really does not fit.
    last_human = [m for m in history if isinstance(m, HumanMessage)][-1:]
    return list(last_human)
