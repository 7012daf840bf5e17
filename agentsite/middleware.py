"""Request-scoped plumbing shared by every app."""

import re
import uuid
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

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
