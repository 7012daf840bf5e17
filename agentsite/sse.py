"""Server-Sent Events from Django under ASGI: the wire format
(https://html.spec.whatwg.org/multipage/server-sent-events.html) and the response that
streams it through proxies without being buffered or cached.

A view returns `sse_response(messages())`, where `messages` is an async generator of
`sse_message(...)` strings and `SSE_HEARTBEAT` while there is nothing to say (proxies
and load balancers cut connections idle for a minute or so). When the client goes away,
Django cancels the generator."""

import re
from collections.abc import AsyncIterator

from django.http import StreamingHttpResponse

# A comment line: clients ignore it; it keeps the connection from looking idle.
SSE_HEARTBEAT = ": keep-alive\n\n"
# Seconds of silence after which a stream sends SSE_HEARTBEAT, so that proxies (nginx
# cuts an idle response after 60 s by default) keep it open.
HEARTBEAT_SECONDS = 15.0

# Each of these ends a line in an event stream; `str.splitlines` would split on more.
_LINE_END = re.compile(r"\r\n|\r|\n")


def sse_message(data: str, *, event: str | None = None, id: int | str | None = None) -> str:
    """One message: optional `id:` (what the client sends back as `Last-Event-ID` when
    it reconnects) and `event:` lines, then `data` as one `data:` line per line of it
    (the client joins them with newlines again), then the blank line that ends it."""
    lines = []
    for name, value in (("id", id), ("event", event)):
        if value is not None:
            text = str(value)
            if _LINE_END.search(text) or (name == "id" and "\0" in text):
                raise ValueError(f"an SSE {name} must be one line: {text!r}")
            lines.append(f"{name}: {text}\n")
    lines.extend(f"data: {line}\n" for line in _LINE_END.split(data))
    return "".join(lines) + "\n"


def sse_response(messages: AsyncIterator[str], *, status: int = 200) -> StreamingHttpResponse:
    """Stream `messages` (each a complete message or heartbeat) as `text/event-stream`."""
    response = StreamingHttpResponse(
        messages, status=status, content_type="text/event-stream; charset=utf-8"
    )
    # Not cached, and not buffered by nginx (X-Accel-Buffering) or anything else that
    # would hold the stream back until it ends.
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
