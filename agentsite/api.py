"""The JSON API: one NinjaAPI for the project, mounted at /api/ (the composition root:
it alone imports every app's router and billing's auth classes).

Routes live under /api/v1/ (each app contributes a Router); the OpenAPI schema and its
docs are served at /api/openapi.json and /api/docs, outside the versioned prefix, so
one page documents every version.
"""

from typing import Any

from ninja import NinjaAPI, Swagger
from ninja.openapi.schema import OpenAPISchema

from billing.api import router as billing_router
from billing.auth import ApiKeyBearerAuth, ApiKeyHeaderAuth, SessionAuth
from chat.api import router as chat_router
from chat.runs_api import RUN_EVENT_SCHEMAS
from chat.runs_api import router as runs_router
from tracing.api import router as tracing_router

from .api_errors import error_handlers_install

# Every way a caller may authenticate, tried in order; each sets request.auth to an
# agentsite.auth.Principal and counts the request against the caller's limits. Keys
# first: the session class checks CSRF, which a program sending a key has no token for.
AUTH = [ApiKeyHeaderAuth(), ApiKeyBearerAuth(), SessionAuth()]


class AgentsiteAPI(NinjaAPI):
    def get_openapi_schema(self, **kwargs: Any) -> OpenAPISchema:
        schema = super().get_openapi_schema(**kwargs)
        # What the event streams carry (their `data:`), which no operation returns as JSON.
        schema.add_schema_definitions(RUN_EVENT_SCHEMAS)
        return schema


api = AgentsiteAPI(
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
error_handlers_install(api)

api.add_router("/v1/", tracing_router)
api.add_router("/v1/", billing_router)
api.add_router("/v1/", chat_router)
api.add_router("/v1/", runs_router)
