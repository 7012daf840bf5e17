"""The runs endpoints of the JSON API: start a run in a conversation (wait for it,
stream it, or leave it in the background), read it, cancel it, and follow its events.

A run is detached from the request that started it: a client that disconnects from
`wait` or `stream` only stops reading; the run goes on, and `GET /runs/{id}/events`
(with `Last-Event-ID`) picks up where the client left off.
"""

import json
import re
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

from channels.db import database_sync_to_async
from django.http import HttpRequest, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.urls import reverse
from ninja import Header, Query, Router, Schema, Status

from agentsite.api_errors import errors
from agentsite.auth import Principal, Scope, owned_or_404, require_scope
from agentsite.errors import ApplicationError
from agentsite.idempotency.http import (
    REPLAYED_HEADER,
    idempotency_key_parameter,
    idempotent_request,
    json_response,
)
from agentsite.idempotency.services import IdempotentRequest, StoredResponse, in_flight
from agentsite.sse import HEARTBEAT_SECONDS, SSE_HEARTBEAT, sse_message, sse_response

from . import services
from .event_schemas import FINAL_EVENT_TYPES, run_event_adapter
from .events import Frame, follow
from .frames import MAX_SEQ
from .http import RUN_HEADER
from .models import Message, Run
from .schemas import RunIn, RunOut

router = Router(tags=["runs"])


# The run events, for the API's components: no operation returns one as JSON, so ninja
# would not list them (agentsite.api adds them).
_EVENT_SCHEMA = run_event_adapter.json_schema(ref_template="#/components/schemas/{model}")
RUN_EVENT_SCHEMAS = {
    "RunEvent": {key: value for key, value in _EVENT_SCHEMA.items() if key != "$defs"},
    **_EVENT_SCHEMA["$defs"],
}
_EVENT_STREAM = (
    "Server-Sent Events, one per run event: `id:` its seq (send it back as "
    "`Last-Event-ID` to resume), `event:` its type, `data:` the event (a RunEvent) as JSON; "
    "a comment line after 15 s of silence. The stream ends after the run's final event "
    "(`run.completed`, `run.failed`, `run.cancelled`, ...)."
)
# Before OpenAPI 3.2 an event stream's `schema` describes one event (its `id`, `event` and
# `data` fields), not the payload; the payload is the data's JSON: `contentSchema`.
_SSE_CONTENT = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["id", "event", "data"],
            "properties": {
                "id": {"type": "string", "description": "The event's seq."},
                "event": {"type": "string", "description": "The event's type."},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/RunEvent"},
                },
            },
        }
    }
}


@router.post(
    "/conversations/{conversation_id}/runs",
    response={200: RunOut, 202: RunOut, **errors(400, 401, 403, 404, 409, 413, 422, 429)},
    openapi_extra={
        "parameters": [
            idempotency_key_parameter(
                in_flight="409: the first is still answering (`wait`, `stream`: until its "
                "run is over)."
            )
        ],
        "responses": {
            200: {
                "description": f"`wait`: the finished run. `stream`: {_EVENT_STREAM}",
                "content": _SSE_CONTENT,
            }
        },
    },
)
async def run_create(
    request: HttpRequest, conversation_id: UUID, payload: RunIn
) -> HttpResponseBase:
    """Send a message in a conversation: the agent answers it in a new run. 200 with the
    finished run (`wait`, the default), 200 with its events as they happen (`stream`), or
    202 at once (`background`, the run's URL in `Location`). 409 `run_active` while the
    conversation's previous run is under way. A client that disconnects only stops
    reading: the run goes on (follow it on `/runs/{id}/events`)."""
    caller = require_scope(request, Scope.RUNS)
    submitted, idempotency = await database_sync_to_async(_submit)(
        request, caller, conversation_id, payload
    )
    run = submitted.run
    if submitted.response is not None:  # background's 202, or a replay's stored response
        return json_response(submitted.response, replayed=submitted.replayed)
    assert run is not None  # (the service refuses a lost run without a response)
    if submitted.replayed and run.is_active:
        raise in_flight(run=str(run.id))
    if payload.mode == "stream":
        return _event_stream(run.id, caller=caller, after_seq=0, replayed=submitted.replayed)
    if not submitted.replayed:
        await _over(run.id)
    response = await database_sync_to_async(_finished)(
        caller=caller, run_id=run.id, idempotency=idempotency
    )
    return json_response(response, replayed=submitted.replayed)


def _submit(
    request: HttpRequest, caller: Principal, conversation_id: UUID, payload: RunIn
) -> tuple[services.RunSubmitted, IdempotentRequest | None]:
    idempotency = idempotent_request(request, account_id=caller.account_id, caller=caller.user_id)
    submitted = services.run_submit(
        caller=caller,
        conversation_id=conversation_id,
        content=payload.message,
        idempotency=idempotency,
        # `wait` and `stream` answer once the run is over: their response is derived
        # from the run then (`_finished`), by the first request or by a retry.
        respond=_accepted if payload.mode == "background" else None,
    )
    return submitted, idempotency


def _accepted(run: Run) -> StoredResponse:
    return StoredResponse(202, run_out(run), {"Location": _run_url(run.id)})


def _finished(
    *, caller: Principal, run_id: UUID, idempotency: IdempotentRequest | None
) -> StoredResponse:
    """The `wait` response of a run that is over, stored for the key's retries."""
    response = StoredResponse(200, run_out(_run_get(caller, run_id)), {RUN_HEADER: str(run_id)})
    if idempotency is not None:
        services.run_response_record(idempotency=idempotency, response=response)
    return response


async def _over(run_id: UUID) -> None:
    """Read the run's events until its final one."""
    async for _ in follow(run_id, 0):
        pass


@router.get(
    "/runs/{run_id}",
    response={200: RunOut, **errors(401, 403, 404, 422, 429)},
    url_name="run_get",
)
def run_get(request: HttpRequest, run_id: UUID) -> dict[str, Any]:
    """A run: its status, answer, messages, usage, cost and error."""
    return run_out(_run_get(require_scope(request, Scope.RUNS), run_id))


@router.post(
    "/runs/{run_id}/cancel",
    # 400/413: what the API answers any POST whose body (none is read here) is too big.
    response={202: RunOut, **errors(400, 401, 403, 404, 409, 413, 422, 429)},
)
def run_cancel(request: HttpRequest, run_id: UUID) -> Status[dict[str, Any]]:
    """Stop a run under way (its spending stops at once); 202 with the run as it was
    when asked: its final event and status follow. 409 if it is over already."""
    run = _run_get(require_scope(request, Scope.RUNS), run_id)
    services.run_cancel(conversation=run.conversation, run_id=run.id)
    return Status(202, run_out(run))


class EventsParams(Schema):
    after_seq: int | None = None


@router.get(
    "/runs/{run_id}/events",
    response={200: None, **errors(400, 401, 403, 404, 422, 429)},
    openapi_extra={"responses": {200: {"description": _EVENT_STREAM, "content": _SSE_CONTENT}}},
)
async def run_events(
    request: HttpRequest,
    run_id: UUID,
    params: Query[EventsParams],
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> HttpResponseBase:
    """The run's events as Server-Sent Events: every event after `Last-Event-ID` (or
    `after_seq`; from the first without either), replayed and then live, each once and
    in order, ending after the final event."""
    caller = require_scope(request, Scope.RUNS)
    after_seq = _after_seq(last_event_id, params.after_seq)
    run = await database_sync_to_async(_run_get)(caller, run_id)
    return _event_stream(run.id, caller=caller, after_seq=after_seq, replayed=False)


def _run_get(caller: Principal, run_id: UUID) -> Run:
    return owned_or_404(
        Run.objects.select_related("conversation").prefetch_related("messages"),
        principal=caller,
        name="run",
        owner_field="conversation__owner",
        id=run_id,
    )


def _after_seq(last_event_id: str | None, after_seq: int | None) -> int:
    """Where a follower resumes: the Last-Event-ID header (what EventSource sends back),
    else `after_seq`, else from the first event."""
    if last_event_id is None:
        seq = after_seq or 0
    elif _DIGITS.fullmatch(last_event_id.strip()):
        seq = int(last_event_id)
    else:  # int() would take "+1", "1_0" and other scripts' digits
        seq = -1
    if not 0 <= seq <= MAX_SEQ:
        raise ApplicationError(
            "invalid_last_event_id",
            f"Last-Event-ID and after_seq are the seq of the last event seen: 0 to {MAX_SEQ}.",
            http_status=400,
        )
    return seq


_DIGITS = re.compile(r"[0-9]{1,19}")


def _event_stream(
    run_id: UUID, *, caller: Principal, after_seq: int, replayed: bool
) -> StreamingHttpResponse:
    sees_budget = caller.has_scope(Scope.USAGE)

    async def messages() -> AsyncIterator[str]:
        async for frame in follow(run_id, after_seq, idle=HEARTBEAT_SECONDS):
            if frame is None:
                yield SSE_HEARTBEAT
            else:
                text = frame.text if sees_budget else _without_budget(frame)
                yield sse_message(text, event=frame.type, id=frame.seq)

    response = sse_response(messages())
    response[RUN_HEADER] = str(run_id)
    if replayed:
        response[REPLAYED_HEADER] = "true"
    return response


def _without_budget(frame: Frame) -> str:
    """The event without the account's budget (a final event's `budget`): the account's
    usage and limits are what the `usage` scope guards, and a key may have `runs`
    without it. Only final events carry it; the others pass as they were encoded."""
    if frame.type not in FINAL_EVENT_TYPES:
        return frame.text
    event = frame.event()
    event.pop("budget", None)
    return json.dumps(event)


def run_out(run: Run) -> dict[str, Any]:
    """The run as RunOut's data (also what an Idempotency-Key stores)."""
    messages = list(run.messages.all())
    answers = [
        m.content
        for m in messages
        if m.role == Message.Role.ASSISTANT and m.content and not m.imported
    ]
    data = {
        "id": run.id,
        "conversation": run.conversation_id,
        "status": run.status,
        "model": run.model,
        "answer": "\n\n".join(answers) if answers else None,
        "messages": [
            {
                "id": m.id,
                "role": m.role,
                "content": m.content,
                "tool": m.tool,
                "run_id": m.run_id,
                "imported": m.imported,
                "created_at": m.created_at,
            }
            for m in messages
        ],
        "steps": run.steps,
        "usage": {
            "input_tokens": run.input_tokens,
            "output_tokens": run.output_tokens,
            "total_tokens": run.total_tokens,
        },
        "cost_usd": None if run.cost_usd is None else format(run.cost_usd, "f"),
        "error": {"code": run.error_code, "message": run.error_message} if run.error_code else None,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }
    return RunOut.model_validate(data).model_dump()


def _run_url(run_id: UUID) -> str:
    return reverse("api:run_get", kwargs={"run_id": run_id})
