"""Request-scoped plumbing shared by every app."""

import re
import uuid
from collections.abc import Awaitable, Callable

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


class RequestIdMiddleware:
    """Gives every request an id (X-Request-ID), logged with each line it causes."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Response | Awaitable[Response]]):
        self.get_response = get_response
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Response | Awaitable[Response]:
        if self._is_async:
            return self._acall(request)
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


class ApiBoundaryMiddleware:
    """What the JSON API answers before and after its operations, in its error shape:
    413 `request_too_large` for a body over AGENT_API_MAX_BODY_BYTES (refused on its
    Content-Length before anything reads it), and 405 `method_not_allowed` (ninja
    answers that one itself, in plain text)."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Response | Awaitable[Response]]):
        self.get_response = get_response
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Response | Awaitable[Response]:
        if self._is_async:
            return self._acall(request)
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
        limit = settings.AGENT_API_MAX_BODY_BYTES
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return error_response("bad_request", "Content-Length is not a number.", status=400)
        if declared > limit:
            return request_too_large(limit)
        if declared == 0 and request.method not in ("GET", "HEAD", "OPTIONS"):
            # No length given (a chunked body): the ASGI handler has already buffered it
            # (Django bounds that read by DATA_UPLOAD_MAX_MEMORY_SIZE); measure it.
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
