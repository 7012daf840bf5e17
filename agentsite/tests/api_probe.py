"""A URLconf for tests: the project's URLs plus operations that exercise the API's auth
and error handling in ways no real endpoint does yet (an unsafe method, async, failures),
composed exactly as agentsite.api composes the real ones."""

from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.http import HttpRequest
from django.urls import include, path
from ninja import NinjaAPI, Schema

from agentsite.api import AUTH
from agentsite.api_errors import error_handlers_install, errors
from agentsite.auth import Scope, aowned_or_404, owned_or_404, principal, require_scope
from chat.models import Conversation


class PrincipalOut(Schema):
    user_id: int
    account_id: int
    api_key_id: int | None
    scopes: list[str] | None


class EchoIn(Schema):
    text: str


def _out(request: HttpRequest) -> dict[str, Any]:
    caller = principal(request)
    return {
        "user_id": caller.user_id,
        "account_id": caller.account_id,
        "api_key_id": caller.api_key_id,
        "scopes": sorted(caller.scopes) if caller.scopes is not None else None,
    }


probe = NinjaAPI(title="probe", urls_namespace="probe", auth=AUTH, docs_url=None)
error_handlers_install(probe)


@probe.get("/whoami", response={200: PrincipalOut, **errors(401, 403, 429)})
def whoami(request: HttpRequest) -> dict[str, Any]:
    return _out(request)


@probe.get("/async/whoami", response={200: PrincipalOut, **errors(401, 403, 429)})
async def async_whoami(request: HttpRequest) -> dict[str, Any]:
    require_scope(request, Scope.RUNS)
    return _out(request)


@probe.get("/conversations/{conversation_id}", response={200: dict, **errors(401, 404)})
def conversation(request: HttpRequest, conversation_id: UUID) -> dict[str, Any]:
    found = owned_or_404(
        Conversation.objects.all(),
        principal=principal(request),
        name="conversation",
        id=conversation_id,
    )
    return {"id": str(found.id)}


@probe.get("/async/conversations/{conversation_id}", response={200: dict, **errors(401, 404)})
async def async_conversation(request: HttpRequest, conversation_id: str) -> dict[str, Any]:
    found = await aowned_or_404(
        Conversation.objects.all(),
        principal=principal(request),
        name="conversation",
        id=conversation_id,
    )
    return {"id": str(found.id)}


@probe.post("/echo", response={200: EchoIn, **errors(401, 403, 413, 422, 429)})
def echo(request: HttpRequest, body: EchoIn) -> EchoIn:
    require_scope(request, Scope.RUNS)
    return body


@probe.post("/invalid", response={200: dict, **errors(401, 422)})
def invalid(request: HttpRequest) -> dict[str, Any]:
    raise ValidationError({"title": ["Too long."]})


@probe.get("/boom", response={200: dict, **errors(401, 500)})
def boom(request: HttpRequest) -> dict[str, Any]:
    raise RuntimeError("secret internals")


urlpatterns = [
    path("api/probe/", probe.urls),
    path("", include("agentsite.urls")),
]
