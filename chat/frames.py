"""Validation of the JSON frames a browser sends over the chat WebSocket."""

import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.conf import settings

from agentsite.errors import ApplicationError


@dataclass(frozen=True)
class ClientFrame:
    type: str
    content: Any = None
    run: UUID | None = None
    after_seq: int = 0


FRAME_TYPES = ("message", "cancel", "resume")
# The largest `after_seq` a resume may name: the largest integer PostgreSQL and SQLite
# store (signed 64 bits), so that `0-<after_seq + 1>`, what the Redis event log asks for,
# still fits a stream id's unsigned 64 bits (2**64 made Redis refuse the XRANGE).
MAX_SEQ = 2**63 - 1


def max_frame_chars() -> int:
    # Room for the message itself plus JSON escaping and the other fields.
    return settings.AGENT_MAX_MESSAGE_CHARS * 6 + 1024


def parse_client_frame(text: str | None) -> ClientFrame:
    if text is None:
        raise ApplicationError("invalid_frame", "Send JSON text frames, not binary ones.")
    if len(text) > max_frame_chars():
        raise ApplicationError(
            "frame_too_large",
            f"The frame is larger than {max_frame_chars()} characters; messages are limited "
            f"to {settings.AGENT_MAX_MESSAGE_CHARS} characters.",
        )
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError as error:
        # The decoder recurses once per level; a frame is a flat object, so anything this
        # deep is hostile and must not take the socket down.
        raise ApplicationError(
            "invalid_json", "The frame is nested too deeply; a frame is a flat JSON object."
        ) from error
    except ValueError as error:
        raise ApplicationError("invalid_json", f"The frame is not valid JSON: {error}.") from error
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ApplicationError(
            "invalid_frame", 'A frame is a JSON object with a "type", e.g. {"type": "message"}.'
        )
    frame_type = data["type"]
    if frame_type not in FRAME_TYPES:
        raise ApplicationError(
            "unknown_type",
            f"Unknown frame type {frame_type[:40]!r}; expected one of {', '.join(FRAME_TYPES)}.",
        )
    if frame_type == "message":
        return ClientFrame(type="message", content=data.get("content"))
    run = _optional_uuid(data.get("run"))
    if frame_type == "cancel":
        return ClientFrame(type="cancel", run=run)
    after_seq = data.get("after_seq", 0)
    if run is None or type(after_seq) is not int or not 0 <= after_seq <= MAX_SEQ:
        raise ApplicationError(
            "invalid_frame",
            'resume needs "run" (a run id) and "after_seq" (the last seq seen, from 0 to '
            f"{MAX_SEQ}).",
        )
    return ClientFrame(type="resume", run=run, after_seq=after_seq)


def _refuse_constant(name: str) -> Any:
    # Python's decoder accepts NaN and Infinity, which JSON (RFC 8259) does not have.
    raise ValueError(f"{name} is not a JSON value")


def _optional_uuid(value: Any) -> UUID | None:
    if value is None:
        return None
    # Only strings are looked at: str() of a deeply nested list would recurse.
    if not isinstance(value, str):
        raise ApplicationError("invalid_frame", '"run" must be a run id (a string).')
    try:
        return UUID(value)
    except ValueError as error:
        raise ApplicationError("invalid_frame", f"{value[:40]!r} is not a run id.") from error
