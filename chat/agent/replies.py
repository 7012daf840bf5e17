"""A model's reply, checked before anything acts on it.

langchain parses streamed tool arguments leniently (`parse_partial_json`): arguments cut
short, say `{"expression": "1234 * 5`, come out as a valid call with cut values, and
arguments that are JSON but not an object go to `invalid_tool_calls`, which nothing
answers. Here a tool call runs only if its arguments, exactly as streamed, are a
complete JSON object; every other call is answered with an error the model can act on,
so the stored history stays valid (every tool call has a result).
"""

import json
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    InvalidToolCall,
    ToolCall,
    ToolMessage,
    message_chunk_to_message,
)
from langchain_core.messages.tool import invalid_tool_call, tool_call

# How much of the rejected arguments the error quotes back to the model.
QUOTED_CHARS = 200

# In a reply's response_metadata: the rejected calls' arguments as streamed, by call id,
# for the user to see (the history carries "{}" in their place; see below).
REJECTED_ARGUMENTS = "rejected_tool_call_arguments"


def reply_from_stream(whole: AIMessageChunk) -> AIMessage:
    """The reply made of its summed chunks, its tool calls checked (module docstring)."""
    reply = message_chunk_to_message(whole)
    assert isinstance(reply, AIMessage)
    if not whole.tool_call_chunks:  # not streamed piece by piece: parsed by the provider
        return reply
    valid: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    rejected: dict[str, str] = {}
    for part in whole.tool_call_chunks:
        name, raw, call_id = part["name"] or "", part["args"] or "", part["id"]
        args, error = _parse_arguments(name, raw)
        if args is not None:
            valid.append(tool_call(name=name, args=args, id=call_id))
        else:
            # The history carries "{}" in place of what was sent: some compatible
            # servers parse the arguments of past calls and fail on broken ones.
            invalid.append(invalid_tool_call(name=name, args="{}", id=call_id, error=error))
            rejected[call_id or ""] = raw
    bad_ids = {call["id"] for call in invalid}
    update: dict[str, Any] = {
        "tool_calls": valid,
        "invalid_tool_calls": invalid,
        "content": _without_arguments(reply.content, bad_ids),
    }
    if rejected:
        update["response_metadata"] = {**reply.response_metadata, REJECTED_ARGUMENTS: rejected}
    return reply.model_copy(update=update)


def rejected_arguments(reply: AIMessage, call: InvalidToolCall) -> str:
    """The arguments of a call `reply` carries as invalid, as the model sent them."""
    rejected = reply.response_metadata.get(REJECTED_ARGUMENTS) or {}
    return rejected.get(call.get("id") or "", call.get("args") or "")


def _parse_arguments(name: str, raw: str) -> tuple[dict[str, Any] | None, str]:
    # Some compatible servers send no arguments at all for a tool without parameters.
    if not raw.strip():
        return {}, ""
    quoted = raw[:QUOTED_CHARS] + ("…" if len(raw) > QUOTED_CHARS else "")
    try:
        args = json.loads(raw)
    except ValueError:
        return None, (
            f"Error: the arguments of this call to {name} are not complete JSON "
            f"({quoted!r}), so it was not run. If your output was cut short, call it "
            "again with shorter arguments."
        )
    if not isinstance(args, dict):
        return None, (
            f"Error: the arguments of a call to {name} must be a JSON object of its "
            f"parameters, not {quoted!r}; it was not run. Call it again with an object."
        )
    return args, ""


def _without_arguments(content: str | list[Any], bad_ids: set[str | None]) -> str | list[Any]:
    """Anthropic's replies also carry each tool call as a content block with the raw
    arguments (`partial_json`), which langchain-anthropic sends back as the call's input:
    a rejected call is sent back with no input instead."""
    if not bad_ids or isinstance(content, str):
        return content
    cleaned: list[Any] = []
    for block in content:
        if (
            isinstance(block, dict)
            and block.get("type") == "tool_use"
            and block.get("id") in bad_ids
        ):
            block = {k: v for k, v in block.items() if k != "partial_json"} | {"input": {}}
        cleaned.append(block)
    return cleaned


def invalid_tool_result(call: InvalidToolCall) -> ToolMessage:
    """The answer to a tool call that was not run because its arguments were unusable."""
    return ToolMessage(
        content=call.get("error") or "Error: this tool call could not be read; it was not run.",
        tool_call_id=call.get("id") or "",
        name=call.get("name") or "",
        status="error",
    )


def stopped_at_output_cap(reply: AIMessage) -> bool:
    """The provider stopped the reply because it reached its output cap (`max_tokens`)."""
    metadata = reply.response_metadata
    return metadata.get("finish_reason") == "length" or metadata.get("stop_reason") == "max_tokens"
