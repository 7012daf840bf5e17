"""The HTTP side of Idempotency-Key: reading it from a request, and answering a replay."""

from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, HttpResponse, JsonResponse

from .services import IdempotentRequest, StoredResponse, idempotency_key_clean, request_fingerprint

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


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
