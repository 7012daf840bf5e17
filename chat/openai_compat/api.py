"""The OpenAI-compatible API: a NinjaAPI of its own (`openai_api`, which the
composition root builds with the auth it configures), mounted at /openai/v1/, so that
every error it gives (authentication, validation and wrong methods included) has
OpenAI's shape; its OpenAPI schema is its own (/openai/v1/openapi.json), apart from
/api's. This adapter parses, calls `chat.services`, and renders."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from inspect import iscoroutinefunction
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.core.exceptions import RequestDataTooBig
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    JsonResponse,
)
from django.http.response import HttpResponseBase
from django.urls import URLPattern, URLResolver, reverse
from django.views.decorators.csrf import csrf_exempt
from ninja import NinjaAPI, Router
from ninja.errors import AuthenticationError, HttpError, ValidationError

from agentsite.auth import Scope, require_scope
from agentsite.errors import ApplicationError
from agentsite.idempotency.http import (
    REPLAYED_HEADER,
    idempotency_key_parameter,
    idempotent_request,
    json_response,
)
from agentsite.idempotency.services import (
    IdempotentRequest,
    StoredResponse,
    idempotency_record,
    in_flight,
)
from agentsite.sse import HEARTBEAT_SECONDS, SSE_HEARTBEAT, sse_response
from chat import services
from chat.agent.models import model_info
from chat.events import Event, follow
from chat.http import RUN_HEADER
from chat.lifecycle import FINAL_EVENTS
from chat.models import Conversation, Run

from . import wire
from .schemas import ChatCompletionIn, ErrorOut, ModelListOut, ModelOut

logger = logging.getLogger(__name__)

# The request header that binds a request to a stored conversation, and the response
# headers that link to what the request started (its run: RUN_HEADER, as /api's): its
# trace in the JSON API (the key reads it) and as a page (for a signed-in browser).
CONVERSATION_HEADER = "X-Agentsite-Conversation"
TRACE_HEADER = "X-Agentsite-Trace"
TRACE_PAGE_HEADER = "X-Agentsite-Trace-Page"
FINAL_TYPES = frozenset(FINAL_EVENTS.values())
ERRORS = {
    status: ErrorOut for status in (400, 401, 403, 404, 405, 409, 413, 422, 429, 500, 502, 503)
}

router = Router()


class OpenAIAPI(NinjaAPI):
    @property
    def urls(self) -> tuple[list[URLResolver | URLPattern], str, str]:
        patterns, app_name, namespace = super().urls
        for pattern in patterns:
            # ninja answers a method no operation takes itself, in plain text.
            if isinstance(pattern, URLPattern):
                pattern.callback = _with_openai_405(pattern.callback)
        return patterns, app_name, namespace


def openai_api(*, auth: Sequence[Callable[..., Any]]) -> NinjaAPI:
    """The API, its callers authenticated by `auth` (each sets request.auth to an
    agentsite.auth.Principal and request.user to the key's user; an OpenAI SDK sends
    its key as `Authorization: Bearer`)."""
    api = OpenAIAPI(
        title="Agentsite OpenAI-compatible API",
        version="1",
        urls_namespace="openai",
        auth=list(auth),
        docs_url=None,
        openapi_url="/openapi.json",
    )
    api.exception_handler(wire.OpenAIError)(_openai_error)
    api.exception_handler(ApplicationError)(_application_error)
    api.exception_handler(AuthenticationError)(_authentication_error)
    api.exception_handler(ValidationError)(_validation_error)
    api.exception_handler(HttpError)(_http_error)
    api.exception_handler(RequestDataTooBig)(_too_big)
    api.exception_handler(Exception)(_unexpected)
    api.add_router("/", router)
    return api


def _error_response(error: wire.OpenAIError) -> JsonResponse:
    return JsonResponse(error.body(), status=error.status, headers=error.headers)


def _openai_error(request: HttpRequest, error: wire.OpenAIError) -> HttpResponse:
    return _error_response(error)


def _application_error(request: HttpRequest, error: ApplicationError) -> HttpResponse:
    return _error_response(wire.error_of(error))


def _authentication_error(request: HttpRequest, error: AuthenticationError) -> HttpResponse:
    return _error_response(
        wire.OpenAIError(
            401,
            "Send an Agentsite API key as the bearer token (Authorization: Bearer ak_...).",
            code="invalid_api_key",
        )
    )


def _validation_error(request: HttpRequest, error: ValidationError) -> HttpResponse:
    first = error.errors[0] if error.errors else {}
    # ninja's location starts with where it looked ("body") and the argument's name.
    location = [str(part) for part in first.get("loc", ())][2:]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in location).lstrip(".")
    message = first.get("msg", "The request is not valid.")
    return _error_response(
        wire.OpenAIError(
            400, f"{param}: {message}" if param else message, code="invalid_request", param=param
        )
    )


def _http_error(request: HttpRequest, error: HttpError) -> HttpResponse:
    # ninja's own: a body that is not JSON, say.
    return _error_response(wire.OpenAIError(error.status_code, str(error), code="invalid_request"))


def _too_big(request: HttpRequest, error: RequestDataTooBig) -> HttpResponse:
    # Over DATA_UPLOAD_MAX_MEMORY_SIZE (Django's own limit on a body read at once).
    return _error_response(
        wire.OpenAIError(413, "The request body is too large.", code="too_large")
    )


def _unexpected(request: HttpRequest, error: Exception) -> HttpResponse:
    logger.exception("openai api: unexpected error", exc_info=error)
    return _error_response(
        wire.OpenAIError(500, "Something went wrong on our side; it has been logged.")
    )


def _with_openai_405(view: Callable[..., Any]) -> Callable[..., Any]:
    def reshaped(response: HttpResponseBase) -> HttpResponseBase:
        if not isinstance(response, HttpResponseNotAllowed):
            return response
        allowed = response["Allow"]
        error = wire.OpenAIError(
            405, f"This endpoint allows {allowed} only.", code="method_not_allowed"
        )
        return JsonResponse(error.body(), status=405, headers={"Allow": allowed})

    if iscoroutinefunction(view):

        async def async_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            return reshaped(await view(request, *args, **kwargs))

        wrapped: Callable[..., Any] = async_view
    else:

        def sync_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            return reshaped(view(request, *args, **kwargs))

        wrapped = sync_view
    return csrf_exempt(wrapped)  # as ninja's views are


@csrf_exempt
def route_not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Any path under /openai/ that names no operation (mounted after the API's routes)."""
    error = wire.OpenAIError(404, f"There is no endpoint at {request.path}.", code="unknown_url")
    return JsonResponse(error.body(), status=error.status)


# -- models -----------------------------------------------------------------------------


def _model() -> ModelOut:
    # `created` is a timestamp in OpenAI's listing; the model is the agent's, not ours to date.
    return ModelOut(id=model_info().name, created=0, owned_by="agentsite")


@router.get("/models", response={200: ModelListOut, **ERRORS}, summary="The model the agent uses")
def model_list(request: HttpRequest) -> ModelListOut:
    return ModelListOut(data=[_model()])


@router.get("/models/{model_id}", response={200: ModelOut, **ERRORS}, summary="One model")
def model_get(request: HttpRequest, model_id: str) -> ModelOut:
    _model_check(model_id)
    return _model()


def _model_check(model_id: str | None) -> None:
    if model_id and model_id != model_info().name:
        raise wire.OpenAIError(
            404,
            f"The model {model_id!r} does not exist here; this server's agent uses "
            f"{model_info().name!r} (see /models).",
            code="model_not_found",
            param="model",
        )


# -- chat completions -------------------------------------------------------------------


@router.post(
    "/chat/completions",
    response={200: dict[str, Any], **ERRORS},
    summary="Answer the messages with the agent (streamed or not)",
    openapi_extra={
        "parameters": [
            idempotency_key_parameter(in_flight="409: the first one's run is still answering.")
        ]
    },
)
async def chat_completions(request: HttpRequest, body: ChatCompletionIn) -> HttpResponseBase:
    caller = require_scope(request, Scope.RUNS)
    _model_check(body.model)
    if body.n not in (None, 1):
        raise wire.OpenAIError(
            400, "Only one choice (n=1) is made.", code="invalid_request", param="n"
        )
    if body.tools or body.functions:
        raise wire.OpenAIError(
            400,
            "The agent's own tools run on the server; a client's tools cannot be offered.",
            code="invalid_request",
            param="tools" if body.tools else "functions",
        )
    prompt = wire.prompt_of(body.messages)
    idempotency = idempotent_request(request, account_id=caller.account_id, caller=caller.user_id)
    # With a key, a client that leaves can come back for the answer (a retry with the
    # key); without one it cannot, and its run is stopped rather than left spending.
    abandon = idempotency is None
    # The key's user (set by its auth): what it starts is theirs, as in the browser.
    assert isinstance(request.user, User)
    submitted = await _started(
        database_sync_to_async(_run_start)(
            owner=request.user,
            api_key_id=caller.api_key_id,
            prompt=prompt,
            bound=request.headers.get(CONVERSATION_HEADER),
            idempotency=idempotency,
        ),
        abandon=abandon,
    )
    if submitted.response is not None:  # the stored answer of an earlier request
        return json_response(submitted.response, replayed=True)
    run = submitted.run
    assert run is not None  # (the service refuses a lost run without a response)
    if submitted.replayed and run.is_active:
        raise wire.error_of(in_flight(run=str(run.id)))
    headers = {
        RUN_HEADER: str(run.id),
        CONVERSATION_HEADER: str(run.conversation_id),
        TRACE_HEADER: request.build_absolute_uri(reverse("api:run_trace", args=[run.id])),
        TRACE_PAGE_HEADER: request.build_absolute_uri(reverse("tracing:detail", args=[run.id])),
        **wire.NO_RETRY,
    }
    created = int(run.created_at.timestamp())
    if body.stream:
        options = body.stream_options
        chunks = wire.Chunks(
            run_id=run.id,
            created=created,
            model=run.model,
            include_usage=bool(options and options.include_usage),
        )
        response = sse_response(_stream(run, chunks, abandon=abandon))
        for name, value in headers.items():
            response[name] = value
        if submitted.replayed:
            response[REPLAYED_HEADER] = "true"
        return response
    final = await _final(run, abandon=abandon)
    try:
        answer = StoredResponse(
            200,
            wire.completion(
                run_id=run.id,
                created=created,
                model=run.model,
                content=_content(final),
                final=final,
            ),
            headers,
        )
    except wire.OpenAIError as error:
        answer = StoredResponse(error.status, error.body(), {**headers, **error.headers})
    if idempotency is not None:
        # The response of a run that is over: the key's retries get it again.
        await database_sync_to_async(idempotency_record)(request=idempotency, response=answer)
    return json_response(answer, replayed=submitted.replayed)


def _run_start(
    *,
    owner: User,
    api_key_id: int | None,
    prompt: wire.Prompt,
    bound: str | None,
    idempotency: IdempotentRequest | None,
) -> services.RunSubmitted:
    try:
        return services.run_start(
            owner=owner,
            conversation_id=bound,
            source=Conversation.Source.OPENAI,
            content=prompt.content,
            history=prompt.history,
            instructions=prompt.instructions,
            api_key_id=api_key_id,
            idempotency=idempotency,
        )
    except ApplicationError as error:
        refused = wire.error_of(error, prompt=prompt)
        if error.code == "not_found":
            refused.code, refused.param = "conversation_not_found", CONVERSATION_HEADER
        raise refused from error


async def _started(
    start: Awaitable[services.RunSubmitted], *, abandon: bool
) -> services.RunSubmitted:
    """What `start` submits. A client that leaves meanwhile (this request is cancelled)
    does not leave its run going unwatched if `abandon`: it is stopped once it exists."""
    starting = asyncio.ensure_future(start)
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        if abandon:
            starting.add_done_callback(_abandon_once_started)
        raise


def _abandon_once_started(starting: "asyncio.Future[services.RunSubmitted]") -> None:
    if starting.cancelled() or starting.exception() is not None:
        return
    run = starting.result().run
    if run is not None:
        services.run_abandon_in_background(run_id=run.id)


def _content(final: Event) -> str:
    """The answer: the run's assistant messages (text before and after its tool calls),
    joined as the JSON API joins them (RunOut.answer)."""
    return "\n\n".join(m["content"] for m in final["messages"] if m["content"])


async def _final(run: Run, *, abandon: bool) -> Event:
    async for event in _events(run, abandon=abandon):
        if event is not None and event["type"] in FINAL_TYPES:
            return event
    raise wire.run_gone()


class _Redo:
    """The text of a step cut by its process's death, which the resumed run streams
    again (`run.resumed`): a client cannot take back what it was sent, so what it has of
    the step already is not sent twice while the new text repeats it; new text that
    differs goes out as a new paragraph."""

    def __init__(self, sent: str) -> None:
        self.sent = sent
        self.again = ""

    def pass_on(self, text: str) -> tuple[str, bool]:
        """What of the step's next token to send, and whether the redo is over."""
        self.again += text
        if self.sent.startswith(self.again):
            return "", self.again == self.sent
        if self.again.startswith(self.sent):
            return self.again[len(self.sent) :], True
        return "\n\n" + self.again, True


async def _stream(run: Run, chunks: wire.Chunks, *, abandon: bool) -> AsyncIterator[str]:
    yield chunks.delta({"role": "assistant", "content": ""})
    # Tokens do not say which message they belong to: a tool call between two of them
    # starts a new one, which the answer separates as RunOut.answer does.
    streamed = new_message = False
    step = ""  # the text sent since the last tool step: what a resumed run may redo
    redo: _Redo | None = None
    async for event in _events(run, abandon=abandon):
        if event is None:
            yield SSE_HEARTBEAT
        elif event["type"] == "token":
            text = event["text"]
            if redo is not None:
                text, over = redo.pass_on(text)
                redo = None if over else redo
                if not text:
                    continue
            step += text
            text = ("\n\n" if streamed and new_message else "") + text
            streamed, new_message = True, False
            yield chunks.delta({"content": text})
        elif event["type"] == "run.resumed":
            redo = _Redo(step) if step else None
        elif event["type"] in ("tool.started", "tool.finished"):
            new_message, step, redo = True, "", None
        else:
            try:
                finish_reason = wire.finish_reason_of(event)
            except wire.OpenAIError as error:
                yield wire.sse(error.body())
                return
            content = _content(event)
            if not streamed and content:
                # Its tokens are no longer in the event log (a replay, long after): the
                # answer in one piece.
                yield chunks.delta({"content": content})
            yield chunks.delta({}, finish_reason)
            if chunks.include_usage:
                yield chunks.usage(event)
            yield wire.DONE
            return
    yield wire.sse(wire.run_gone().body())


_SHOWN = frozenset({"token", "tool.started", "tool.finished", "run.resumed"})


async def _events(run: Run, *, abandon: bool) -> AsyncIterator[Event | None]:
    """The run's tokens, tool steps and final event, from its first, and None when it
    is silent for a while. A client that leaves before the final one (the request is
    cancelled) stops the run if `abandon`."""
    finished = False
    try:
        async for frame in follow(run.id, idle=HEARTBEAT_SECONDS):
            if frame is None:
                yield None
            elif frame.type in _SHOWN or frame.type in FINAL_TYPES:
                finished = frame.type in FINAL_TYPES
                yield json.loads(frame.text)
        finished = True  # without a final event: the run was deleted meanwhile
    finally:
        if abandon and not finished:
            services.run_abandon_in_background(run_id=run.id)
