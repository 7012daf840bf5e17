"""The OpenAI-compatible API: a NinjaAPI of its own, mounted at /openai/v1/, so that
every error it gives (authentication and validation included) has OpenAI's shape; its
OpenAPI schema is its own (/openai/v1/openapi.json), apart from /api's."""

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from agentsite.auth import Principal, require_scope
from agentsite.errors import ApplicationError
from agentsite.sse import SSE_HEARTBEAT, sse_response
from billing.auth import ApiKeyBearerAuth
from billing.models import ApiKey
from chat import selectors, services
from chat.agent.models import model_info
from chat.events import Event, follow
from chat.lifecycle import FINAL_EVENTS, lease_keeper
from chat.models import Conversation, Run
from chat.runs_api import HEARTBEAT_SECONDS, RUN_HEADER

from . import wire
from .schemas import ChatCompletionIn, ErrorOut, ModelListOut, ModelOut

logger = logging.getLogger(__name__)

# The request header that binds a request to a stored conversation, and the response
# headers that link to what the request started (its run: RUN_HEADER, as /api's).
CONVERSATION_HEADER = "X-Agentsite-Conversation"
TRACE_HEADER = "X-Agentsite-Trace"
FINAL_TYPES = frozenset(FINAL_EVENTS.values())
ERRORS = {status: ErrorOut for status in (400, 401, 403, 404, 409, 413, 429, 500, 502, 503)}


api = NinjaAPI(
    title="Agentsite OpenAI-compatible API",
    version="1",
    urls_namespace="openai",
    # An Agentsite API key as the bearer token, as the OpenAI SDKs send theirs.
    auth=ApiKeyBearerAuth(),
    docs_url=None,
    openapi_url="/openapi.json",
)


def _error_response(request: HttpRequest, error: wire.OpenAIError) -> HttpResponse:
    response = api.create_response(request, error.body(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


@api.exception_handler(wire.OpenAIError)
def openai_error(request: HttpRequest, error: wire.OpenAIError) -> HttpResponse:
    return _error_response(request, error)


@api.exception_handler(ApplicationError)
def application_error(request: HttpRequest, error: ApplicationError) -> HttpResponse:
    return _error_response(request, wire.error_of(error))


@api.exception_handler(AuthenticationError)
def authentication_error(request: HttpRequest, error: AuthenticationError) -> HttpResponse:
    return _error_response(
        request,
        wire.OpenAIError(
            401,
            "Send an Agentsite API key as the bearer token (Authorization: Bearer ak_...).",
            code="invalid_api_key",
        ),
    )


@api.exception_handler(ValidationError)
def validation_error(request: HttpRequest, error: ValidationError) -> HttpResponse:
    first = error.errors[0] if error.errors else {}
    # ninja's location starts with where it looked ("body") and the argument's name.
    location = [str(part) for part in first.get("loc", ())][2:]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in location).lstrip(".")
    message = first.get("msg", "The request is not valid.")
    return _error_response(
        request,
        wire.OpenAIError(
            400, f"{param}: {message}" if param else message, code="invalid_request", param=param
        ),
    )


@api.exception_handler(HttpError)
def http_error(request: HttpRequest, error: HttpError) -> HttpResponse:
    # ninja's own: a body that is not JSON, say.
    return _error_response(
        request, wire.OpenAIError(error.status_code, str(error), code="invalid_request")
    )


@api.exception_handler(RequestDataTooBig)
def too_big(request: HttpRequest, error: RequestDataTooBig) -> HttpResponse:
    # Over DATA_UPLOAD_MAX_MEMORY_SIZE (Django's own limit on a body read at once).
    return _error_response(
        request, wire.OpenAIError(413, "The request body is too large.", code="too_large")
    )


@api.exception_handler(Exception)
def unexpected(request: HttpRequest, error: Exception) -> HttpResponse:
    logger.exception("openai api: unexpected error", exc_info=error)
    return _error_response(
        request,
        wire.OpenAIError(500, "Something went wrong on our side; it has been logged."),
    )


@csrf_exempt
def route_not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Any path under /openai/ that names no operation (mounted after the API's routes)."""
    error = wire.OpenAIError(404, f"There is no endpoint at {request.path}.", code="unknown_url")
    return JsonResponse(error.body(), status=error.status)


# -- models -----------------------------------------------------------------------------


def _model() -> ModelOut:
    # `created` is a timestamp in OpenAI's listing; the model is the agent's, not ours to date.
    return ModelOut(id=model_info().name, created=0, owned_by="agentsite")


@api.get("/models", response={200: ModelListOut, **ERRORS}, summary="The model the agent uses")
def model_list(request: HttpRequest) -> ModelListOut:
    return ModelListOut(data=[_model()])


@api.get("/models/{model_id}", response={200: ModelOut, **ERRORS}, summary="One model")
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


@api.post(
    "/chat/completions",
    response={200: dict[str, Any], **ERRORS},
    summary="Answer the messages with the agent (streamed or not)",
)
async def chat_completions(
    request: HttpRequest, body: ChatCompletionIn
) -> HttpResponse | StreamingHttpResponse:
    caller = require_scope(request, ApiKey.Scope.RUNS)
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
    # The key's user (set by its auth): what it starts is theirs, as in the browser.
    assert isinstance(request.user, User)
    lease_keeper().ensure_started()
    run = await _started(
        database_sync_to_async(_run_start)(
            user=request.user,
            caller=caller,
            prompt=prompt,
            bound=request.headers.get(CONVERSATION_HEADER),
        )
    )
    headers = {
        RUN_HEADER: str(run.id),
        CONVERSATION_HEADER: str(run.conversation_id),
        TRACE_HEADER: request.build_absolute_uri(reverse("tracing:detail", args=[run.id])),
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
        response = sse_response(_stream(run, chunks))
        for name, value in headers.items():
            response[name] = value
        return response
    content, final = await _answer(run)
    try:
        answer = wire.completion(
            run_id=run.id, created=created, model=run.model, content=content, final=final
        )
    except wire.OpenAIError as error:
        error.headers = {**headers, **error.headers}
        raise
    return JsonResponse(answer, headers=headers)


def _run_start(*, user: User, caller: Principal, prompt: wire.Prompt, bound: str | None) -> Run:
    try:
        if bound is None:
            return services.conversation_start(
                owner=user,
                source=Conversation.Source.OPENAI,
                content=prompt.content,
                history=prompt.history,
                instructions=prompt.instructions,
                api_key_id=caller.api_key_id,
            )
        # The agent remembers the stored conversation: only the last message is new.
        conversation = selectors.conversation_get(user=user, conversation_id=bound)
        return services.run_create(
            conversation=conversation,
            content=prompt.content,
            instructions=prompt.instructions,
            api_key_id=caller.api_key_id,
        )
    except ApplicationError as error:
        refused = wire.error_of(error, prompt=prompt)
        if error.code == "not_found":
            refused.code, refused.param = "conversation_not_found", CONVERSATION_HEADER
        raise refused from error


async def _started(start: Awaitable[Run]) -> Run:
    """The run `start` creates. A client that leaves meanwhile (this request is
    cancelled) does not leave it running unwatched: it is stopped once it exists."""
    starting = asyncio.ensure_future(start)
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        starting.add_done_callback(_stop_once_started)
        raise


def _stop_once_started(starting: "asyncio.Future[Run]") -> None:
    if not starting.cancelled() and starting.exception() is None:
        _cancel_in_background(starting.result())


async def _answer(run: Run) -> tuple[str, Event]:
    texts: list[str] = []
    async for event in _events(run):
        if event is None:
            continue
        if event["type"] == "token":
            texts.append(event["text"])
        else:
            return "".join(texts), event
    raise wire.run_gone()


async def _stream(run: Run, chunks: wire.Chunks) -> AsyncIterator[str]:
    yield chunks.delta({"role": "assistant", "content": ""})
    async for event in _events(run):
        if event is None:
            yield SSE_HEARTBEAT
        elif event["type"] == "token":
            yield chunks.delta({"content": event["text"]})
        else:
            try:
                finish_reason = wire.finish_reason_of(event)
            except wire.OpenAIError as error:
                yield wire.sse(error.body())
                return
            yield chunks.delta({}, finish_reason)
            if chunks.include_usage:
                yield chunks.usage(event)
            yield wire.DONE
            return
    yield wire.sse(wire.run_gone().body())


async def _events(run: Run) -> AsyncIterator[Event | None]:
    """The run's tokens and final event, from its first, and None when it is silent for
    a while. A client that leaves before the final one (the request is cancelled) stops
    the run."""
    finished = False
    try:
        async for frame in follow(run.id, idle=HEARTBEAT_SECONDS):
            if frame is None:
                yield None
            elif frame.type == "token" or frame.type in FINAL_TYPES:
                finished = frame.type in FINAL_TYPES
                yield json.loads(frame.text)
        finished = True  # without a final event: the run was deleted meanwhile
    finally:
        if not finished:
            _cancel_in_background(run)


_cancelling: set[asyncio.Task[Any]] = set()


def _cancel_in_background(run: Run) -> None:
    # Not awaited here: this request's task is being cancelled (the client left).
    async def cancel() -> None:
        # It ended meanwhile (ApplicationError), or went with its conversation.
        with contextlib.suppress(ApplicationError, Conversation.DoesNotExist):
            await database_sync_to_async(
                lambda: services.run_cancel(conversation=run.conversation, run_id=run.id)
            )()
        logger.info("run %s: cancelled, its OpenAI client left", run.id)

    task = asyncio.get_running_loop().create_task(cancel())
    _cancelling.add(task)
    task.add_done_callback(_cancelling.discard)
