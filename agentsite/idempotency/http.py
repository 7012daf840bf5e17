"""The HTTP side of Idempotency-Key: reading it from a request, and answering a replay.

A POST that creates something and knows its response when its transaction commits (a
conversation, an API key) needs one call:

    return idempotent_response(request, caller=principal(request), create=lambda: StoredResponse(
        201, ThingOut.from_orm(thing_create(...)).model_dump()))

and declares 400 and 422 among its errors (no 409: its response is recorded with the
key, so a retry never finds the first one still answering), and the `Idempotency-Key` header
(`openapi_extra={"parameters": [idempotency_key_parameter()]}`)."""

from collections.abc import Callable
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, HttpResponse, JsonResponse

from agentsite.auth import Principal

from .services import (
    IdempotentRequest,
    StoredResponse,
    idempotency_key_clean,
    idempotent,
    request_fingerprint,
)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


def idempotency_key_parameter(*, in_flight: str = "") -> dict[str, Any]:
    """The `Idempotency-Key` header as an OpenAPI parameter of an operation that honours
    it; `in_flight`: when that operation answers 409 `idempotency_in_flight`, if it can."""
    return {
        "in": "header",
        "name": HEADER,
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        "description": (
            "Retry safely: a retry with the same key and body gets the first response "
            "again (header `Idempotent-Replayed: true`) and creates nothing. 422: the key "
            f"was used for another request.{' ' + in_flight if in_flight else ''} Keys are "
            "the account's for 24 hours; 1 to 255 printable ASCII characters (a UUID, say)."
        ),
    }


def idempotent_request(
    request: HttpRequest, *, account_id: int, caller: int | str
) -> IdempotentRequest | None:
    """The request's Idempotency-Key, if it sent one (400 if it is blank or too long),
    with the request's fingerprint. `caller`: the user, so that another member of the
    account reusing a key is told so (422) rather than handed the first one's response."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    return IdempotentRequest(
        account_id=account_id,
        key=idempotency_key_clean(key=key),
        fingerprint=request_fingerprint(
            method=request.method or "",
            path=request.get_full_path(),
            caller=caller,
            body=request.body,
        ),
    )


def json_response(response: StoredResponse, *, replayed: bool) -> HttpResponse:
    """A stored response as JSON; a replay says so in `Idempotent-Replayed`."""
    answer = JsonResponse(
        response.body, status=response.status, encoder=DjangoJSONEncoder, safe=False
    )
    for name, value in response.headers.items():
        answer[name] = value
    if replayed:
        answer[REPLAYED_HEADER] = "true"
    return answer


def idempotent_response(
    request: HttpRequest, *, caller: Principal, create: Callable[[], StoredResponse]
) -> HttpResponse:
    """`create`, once per Idempotency-Key of the caller's account (see `idempotent`), as
    the JSON response; a retry gets the first response again, marked as a replay."""
    keyed = idempotent_request(request, account_id=caller.account_id, caller=caller.user_id)
    outcome = idempotent(request=keyed, create=create)
    return json_response(outcome.response, replayed=outcome.replayed)
