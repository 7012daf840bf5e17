"""The JSON API's one error shape, `{"error": {"code", "message", "details"}}`, for every
failure under /api/: what operations raise, what ninja and Django raise around them,
routes that do not exist, methods a route does not allow, bodies that are too large.

Operations declare what they may answer with `errors(...)`, so the OpenAPI schema lists
every status: `response={200: ThingOut, **errors(401, 403, 404, 422, 429)}`.
"""

import logging
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.views.decorators.csrf import csrf_exempt
from ninja import NinjaAPI, Schema
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError

from .errors import ApplicationError

logger = logging.getLogger(__name__)

# Where the API lives: the middleware and the catch-all route answer in its shape here.
API_PREFIX = "/api/"


class ErrorDetail(Schema):
    code: str
    message: str
    # What the code alone does not say: the invalid fields (422), seconds to wait (429).
    details: Any = None


class ErrorOut(Schema):
    error: ErrorDetail


def errors(*statuses: int) -> dict[int, type[ErrorOut]]:
    """The error statuses an operation may answer with, for its `response=`."""
    return dict.fromkeys(statuses, ErrorOut)


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(code: str, message: str, *, status: int, details: Any = None) -> JsonResponse:
    """An error in the API's shape, for code outside ninja (middleware, plain views)."""
    return JsonResponse(error_body(code, message, details), status=status)


# ninja's HttpError carries only a status: its code is the status's name.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    429: "rate_limited",
}


def request_too_large(limit: int) -> JsonResponse:
    return error_response(
        "request_too_large",
        f"The request body is larger than the {limit} bytes allowed.",
        status=413,
    )


def error_handlers_install(api: NinjaAPI) -> None:
    """Answer every exception an operation (or ninja around it) raises in the one
    shape. Unexpected ones are logged with their traceback and answered 500 without
    it, whatever DEBUG says."""

    def respond(
        request: HttpRequest, status: int, code: str, message: str, details: Any = None
    ) -> HttpResponse:
        return api.create_response(request, error_body(code, message, details), status=status)

    @api.exception_handler(ApplicationError)
    def application_error(request: HttpRequest, error: ApplicationError) -> HttpResponse:
        response = respond(
            request, error.http_status, error.code, error.message, error.extra or None
        )
        if "retry_after" in error.extra:  # 429: whole seconds, as RFC 9110 wants
            response["Retry-After"] = str(error.extra["retry_after"])
        return response

    @api.exception_handler(NinjaValidationError)
    def validation_error(request: HttpRequest, error: NinjaValidationError) -> HttpResponse:
        return respond(request, 422, "invalid_request", "The request is not valid.", error.errors)

    @api.exception_handler(DjangoValidationError)
    def model_validation_error(request: HttpRequest, error: DjangoValidationError) -> HttpResponse:
        # A model's or service's own validation: the caller's input, never our 500.
        details = error.message_dict if hasattr(error, "error_dict") else error.messages
        return respond(request, 422, "invalid_request", "The request is not valid.", details)

    @api.exception_handler(AuthenticationError)
    def authentication_error(request: HttpRequest, error: AuthenticationError) -> HttpResponse:
        return respond(request, 401, "unauthenticated", "Sign in or send an API key.")

    @api.exception_handler(HttpError)
    def http_error(request: HttpRequest, error: HttpError) -> HttpResponse:
        code = _HTTP_CODES.get(error.status_code, "error")
        return respond(request, error.status_code, code, error.message)

    @api.exception_handler(MultiPartParserError)
    def unparsable_form(request: HttpRequest, error: MultiPartParserError) -> HttpResponse:
        # A form body Django cannot read (a multipart one without its boundary), met
        # by the session's CSRF check, which reads the form for its token.
        return respond(request, 400, "bad_request", f"The request body cannot be read: {error}")

    @api.exception_handler(Http404)
    def not_found(request: HttpRequest, error: Http404) -> HttpResponse:
        return respond(request, 404, "not_found", "Not found.")

    @api.exception_handler(RequestDataTooBig)
    def too_big(request: HttpRequest, error: RequestDataTooBig) -> HttpResponse:
        # Django's own DATA_UPLOAD_MAX_MEMORY_SIZE, if set below AGENT_API_MAX_BODY_BYTES.
        return respond(request, 413, "request_too_large", "The request body is too large.")

    @api.exception_handler(Exception)
    def unexpected(request: HttpRequest, error: Exception) -> HttpResponse:
        logger.error("unhandled error in %s %s", request.method, request.path, exc_info=error)
        return respond(
            request,
            500,
            "internal_error",
            "Something went wrong on our side; it has been logged.",
        )


@csrf_exempt
def route_not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Any path under /api/ that names no operation (mounted after the API's routes)."""
    return error_response("not_found", f"There is no API endpoint at {request.path}.", status=404)
