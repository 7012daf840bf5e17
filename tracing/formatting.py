"""How durations and payloads read on the trace pages (shared by the views and the
template filters, so the list and the trace page never disagree). Money and counts read
the same everywhere: `agentsite.formatting`."""

import json
from typing import Any


def format_duration(ms: float | None) -> str:
    if ms is None:
        return "—"
    if ms == 0:
        return "0 ms"
    if ms < 0:
        return "−" + format_duration(-ms)
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    minutes, seconds = divmod(ms / 1000, 60)
    return f"{minutes:.0f} min {seconds:02.0f} s"


def format_payload(value: Any) -> str:
    """Readable text for a span input or output: strings as they are (a prompt reads
    better without JSON quoting and \\n escapes), chat messages as a transcript, anything
    else as indented JSON. Plain text; the template escapes it."""
    if isinstance(value, str):
        return value
    if _is_message(value):
        return _format_message(value)
    if isinstance(value, list) and value and all(_is_message(item) for item in value):
        return "\n\n".join(_format_message(item) for item in value)
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def format_compact(value: Any) -> str:
    """A short value on one line (for the facts table)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and "role" in value and "content" in value


def _format_message(message: dict[str, Any]) -> str:
    rest = {key: item for key, item in message.items() if key not in ("role", "content")}
    parts = [f"── {message['role']} ──"]
    if message["content"] not in ("", None):
        parts.append(format_payload(message["content"]))
    for key, item in rest.items():
        text = format_payload(item) if isinstance(item, dict | list) else format_compact(item)
        parts.append(f"{key}: {text}")
    return "\n".join(parts)
