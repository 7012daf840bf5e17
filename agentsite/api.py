"""The JSON API: one NinjaAPI for the project, mounted at /api/.

Routes live under /api/v1/ (each app contributes a Router); the OpenAPI schema and its
docs are served at /api/openapi.json and /api/docs, outside the versioned prefix, so
one page documents every version.
"""

from http import HTTPStatus

from django.http import HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParserError
from ninja import NinjaAPI, Swagger
from ninja.errors import AuthenticationError, HttpError, ValidationError

from billing.api import router as billing_router
from billing.auth import ApiKeyAuth, SessionAuth
from chat.api import router as chat_router
from tracing.api import router as tracing_router

from .errors import ApplicationError

# Every way a caller may authenticate, tried in order. Both count the request against
# the caller's requests-per-minute limits. The key first: a request that sends one is a
# program's, which has no CSRF token for the session check to demand.
AUTH = [ApiKeyAuth(), SessionAuth()]

api = NinjaAPI(
    title="Agentsite API",
    version="1",
    urls_namespace="api",
    auth=AUTH,
    docs_url="/docs",
    # Swagger UI from our static files ("ninja" in INSTALLED_APPS), so the docs work
    # offline; no validator badge, which would send the schema's URL to swagger.io.
    docs=Swagger(settings={"validatorUrl": None}),
    openapi_url="/openapi.json",
)


@api.exception_handler(ApplicationError)
def application_error(request: HttpRequest, error: ApplicationError) -> HttpResponse:
    response = api.create_response(request, {"error": error.as_dict()}, status=error.http_status)
    if "retry_after" in error.extra:  # 429 rate_limited: whole seconds, as RFC 9110 wants
        response["Retry-After"] = str(error.extra["retry_after"])
    return response


@api.exception_handler(ValidationError)
def validation_error(request: HttpRequest, error: ValidationError) -> HttpResponse:
    return api.create_response(
        request,
        {
            "error": {
                "code": "invalid_request",
                "message": "The request is not valid.",
                "details": error.errors,
            }
        },
        status=422,
    )


@api.exception_handler(HttpError)
def http_error(request: HttpRequest, error: HttpError) -> HttpResponse:
    """ninja's own refusals (a body that is not JSON: 400), in the API's error shape."""
    status = HTTPStatus(error.status_code)
    return api.create_response(
        request,
        {"error": {"code": status.phrase.lower().replace(" ", "_"), "message": error.message}},
        status=status,
    )


@api.exception_handler(MultiPartParserError)
def unparsable_form(request: HttpRequest, error: MultiPartParserError) -> HttpResponse:
    # A form body Django cannot read (a multipart one without its boundary), met by the
    # session's CSRF check, which reads the form for its token: was a 500.
    return api.create_response(
        request,
        {"error": {"code": "bad_request", "message": f"The request body cannot be read: {error}"}},
        status=400,
    )


@api.exception_handler(AuthenticationError)
def authentication_error(request: HttpRequest, error: AuthenticationError) -> HttpResponse:
    return api.create_response(
        request,
        {"error": {"code": "unauthenticated", "message": "Sign in or send an API key."}},
        status=401,
    )


api.add_router("/v1/", tracing_router)
api.add_router("/v1/", billing_router)
api.add_router("/v1/", chat_router)
