"""Request-scoped plumbing shared by every app."""

import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponseBase, HttpResponseNotAllowed

from .api_errors import API_PREFIX, error_response, request_too_large
from .logging import request_id_var

# A proxy's id is reused so one request can be followed across nginx and the app; anything
# that does not look like an id is replaced rather than echoed into the logs.
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

Response = HttpResponseBase

# The methods whose body an operation of the JSON API reads.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _SyncAndAsyncMiddleware:
    """A middleware that serves sync and async stacks alike, with no thread hop in
    either: an async stack's requests go to `_acall`, a sync stack's to `_call`."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Response | Awaitable[Response]]):
        self.get_response = get_response
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Response | Awaitable[Response]:
        return self._acall(request) if self._is_async else self._call(request)

    def _call(self, request: HttpRequest) -> Response:
        raise NotImplementedError

    async def _acall(self, request: HttpRequest) -> Response:
        raise NotImplementedError


class RequestIdMiddleware(_SyncAndAsyncMiddleware):
    """Gives every request an id (X-Request-ID), logged with each line it causes."""

    def _call(self, request: HttpRequest) -> Response:
        token = request_id_var.set(self._request_id(request))
        try:
            response = self.get_response(request)
            assert isinstance(response, HttpResponseBase)
            response["X-Request-ID"] = request_id_var.get() or ""
            return response
        finally:
            request_id_var.reset(token)

    async def _acall(self, request: HttpRequest) -> Response:
        token = request_id_var.set(self._request_id(request))
        try:
            response = await self.get_response(request)  # type: ignore[misc]
            response["X-Request-ID"] = request_id_var.get() or ""
            return response
        finally:
            request_id_var.reset(token)

    @staticmethod
    def _request_id(request: HttpRequest) -> str:
        given = request.headers.get("X-Request-ID", "")
        return given if _VALID_ID.match(given) else uuid.uuid4().hex


class ApiBoundaryMiddleware(_SyncAndAsyncMiddleware):
    """What the JSON API answers before and after its operations, in its error shape:
    413 `request_too_large` for a body over AGENT_API_MAX_BODY_BYTES (refused on its
    Content-Length before an operation reads it; 400 `bad_request` if that is no number;
    under ASGI the handler has buffered it already, as far as `api_body_limit` lets it),
    and 405 `method_not_allowed` (ninja answers that one itself, in plain text).

    Only the methods that carry a body to an operation (BODY_METHODS) are refused, and
    every operation of theirs declares 400 and 413; a GET's or DELETE's body is never
    read by an operation, so it is ignored rather than answered with an undeclared
    status. It sits after corsheaders in MIDDLEWARE, so a browser app on an allowed
    origin can read these answers too."""

    def _call(self, request: HttpRequest) -> Response:
        if not request.path_info.startswith(API_PREFIX):
            response = self.get_response(request)
            assert isinstance(response, HttpResponseBase)
            return response
        refused = self._refuse(request)
        if refused is not None:
            return refused
        response = self.get_response(request)
        assert isinstance(response, HttpResponseBase)
        return self._reshape(response)

    async def _acall(self, request: HttpRequest) -> Response:
        if not request.path_info.startswith(API_PREFIX):
            return await self.get_response(request)  # type: ignore[no-any-return,misc]
        refused = self._refuse(request)
        if refused is not None:
            return refused
        response = await self.get_response(request)  # type: ignore[misc]
        return self._reshape(response)

    @staticmethod
    def _refuse(request: HttpRequest) -> Response | None:
        if request.method not in BODY_METHODS:
            return None
        limit = settings.AGENT_API_MAX_BODY_BYTES
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return error_response("bad_request", "Content-Length is not a number.", status=400)
        if declared > limit:
            return request_too_large(limit)
        if declared == 0:
            # No length given (a chunked body): the ASGI handler has buffered it already,
            # without a limit of its own (ASGIHandler.read_body spools every byte; Django
            # checks DATA_UPLOAD_MAX_MEMORY_SIZE against Content-Length only), but no
            # further than agentsite.asgi's api_body_limit lets it: measure it.
            try:
                size = len(request.body)
            except RequestDataTooBig:
                return request_too_large(limit)
            if size > limit:
                return request_too_large(limit)
        return None

    @staticmethod
    def _reshape(response: Response) -> Response:
        if not isinstance(response, HttpResponseNotAllowed):
            return response
        shaped = error_response(
            "method_not_allowed",
            f"This endpoint allows {response['Allow']} only.",
            status=405,
        )
        shaped["Allow"] = response["Allow"]
        return shaped


ASGIReceive = Callable[[], Awaitable[Mapping[str, Any]]]
ASGISend = Callable[[Mapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], ASGIReceive, ASGISend], Awaitable[None]]


def api_body_limit(app: ASGIApp) -> ASGIApp:
    """Bound what Django buffers of a JSON API request's body. ASGIHandler.read_body
    spools the whole body before any middleware runs, with no limit (Django checks
    DATA_UPLOAD_MAX_MEMORY_SIZE against Content-Length only, after the fact), so a
    chunked body of any size would be written to disk before ApiBoundaryMiddleware
    could refuse it. Past AGENT_API_MAX_BODY_BYTES the body ends for Django (which then
    holds more than the limit: ApiBoundaryMiddleware answers 413), and the rest of it is
    read and dropped, as Django expects nothing after the body but the disconnect."""

    async def bounded(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await app(scope, receive, send)
            return
        limit = settings.AGENT_API_MAX_BODY_BYTES
        received = 0
        cut = False

        async def receive_bounded() -> Mapping[str, Any]:
            nonlocal received, cut
            message = await receive()
            while cut and message["type"] == "http.request":
                message = await receive()  # the rest of a body over the limit: dropped
            if message["type"] == "http.request" and message.get("more_body", False):
                received += len(message.get("body", b""))
                if received > limit:
                    cut = True
                    return {**message, "more_body": False}
            return message

        await app(scope, receive_bounded, send)

    return bounded
