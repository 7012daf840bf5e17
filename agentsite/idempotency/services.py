"""Claiming and recording Idempotency-Keys (see the package for the semantics)."""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from agentsite.errors import ApplicationError

from .models import IdempotencyKey

KEEP = timedelta(hours=24)
KEY_MAX_CHARS = 255


@dataclass(frozen=True)
class IdempotentRequest:
    """A request that carries an Idempotency-Key: whose it is and what it asks."""

    account_id: int
    key: str
    fingerprint: str


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: Any  # what DjangoJSONEncoder encodes (as the API's responses)
    headers: dict[str, str] = field(default_factory=dict)


def idempotency_key_clean(*, key: str) -> str:
    # Printable ASCII, as a header value should be (a UUID is the usual key): a NUL, say,
    # is not a key, and PostgreSQL could not store it.
    if not key.strip() or len(key) > KEY_MAX_CHARS or not (key.isascii() and key.isprintable()):
        raise ApplicationError(
            "invalid_idempotency_key",
            f"An Idempotency-Key is 1 to {KEY_MAX_CHARS} printable ASCII characters, not "
            "blank (a UUID, say).",
            http_status=400,
        )
    return key


def request_fingerprint(*, method: str, path: str, caller: int | str, body: bytes) -> str:
    """What makes two requests "the same": method, path (with its query), caller and
    body. A JSON body counts by its content, not its spelling (key order, spacing)."""
    try:
        canonical = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except ValueError:
        canonical = body
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), str(caller).encode(), canonical):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def idempotency_claim(*, request: IdempotentRequest) -> IdempotencyKey | None:
    """Claim the key for this request, in the caller's transaction (the one that creates
    the object: it must `idempotency_record` it before committing). None: claimed, go
    on. Otherwise the row of the earlier request with this key, which was the same
    request; a different one is refused (422).

    On PostgreSQL a second request with the key waits here until the first's
    transaction ends: then it finds the row (committed) or claims the key (rolled back)."""
    if not connection.in_atomic_block:
        raise RuntimeError("idempotency_claim belongs in the transaction that creates.")
    now = timezone.now()
    # Lazily, the account's expired keys (one of them may be this one, free again).
    IdempotencyKey.objects.filter(account_id=request.account_id, created_at__lt=now - KEEP).delete()
    try:
        with transaction.atomic():  # a savepoint: the caller's transaction goes on
            IdempotencyKey.objects.create(
                account_id=request.account_id,
                key=request.key,
                fingerprint=request.fingerprint,
                created_at=now,
            )
        return None
    except IntegrityError:
        earlier = IdempotencyKey.objects.get(account_id=request.account_id, key=request.key)
    if earlier.fingerprint != request.fingerprint:
        raise ApplicationError(
            "idempotency_key_reused",
            "This Idempotency-Key was used for a different request in the last 24 hours; "
            "use a new key for a new request.",
            http_status=422,
        )
    return earlier


def idempotency_record(
    *, request: IdempotentRequest, resource: str = "", response: StoredResponse | None = None
) -> None:
    """What the request with the key created and, if known, its response."""
    fields: dict[str, Any] = {}
    if resource:
        fields["resource"] = resource
    if response is not None:
        fields.update(
            response_status=response.status,
            response_body=response.body,
            response_headers=response.headers,
        )
    IdempotencyKey.objects.filter(account_id=request.account_id, key=request.key).update(**fields)


def stored_response(earlier: IdempotencyKey) -> StoredResponse | None:
    if earlier.response_status is None:
        return None
    return StoredResponse(
        earlier.response_status, earlier.response_body, dict(earlier.response_headers)
    )


def in_flight(**details: Any) -> ApplicationError:
    """409 for a retry of a request still being answered; `details` say what to follow
    meanwhile (the run's id, say)."""
    return ApplicationError(
        "idempotency_in_flight",
        "A request with this Idempotency-Key is still being answered; retry after it finishes.",
        http_status=409,
        **details,
    )


@dataclass(frozen=True)
class Idempotent:
    response: StoredResponse
    # True: the earlier request's response; nothing was created now.
    replayed: bool


def idempotent(
    *, request: IdempotentRequest | None, create: Callable[[], StoredResponse]
) -> Idempotent:
    """For a POST whose response is known when its transaction commits (a conversation,
    an API key): `create` runs once per key, in one transaction with the key's claim;
    a retry gets its response again. Without a key, `create` simply runs."""
    with transaction.atomic():
        if request is not None:
            earlier = idempotency_claim(request=request)
            if earlier is not None:
                # Recorded in the transaction that claimed the key: a claim without its
                # response was rolled back, and the claim above would have won it.
                replay = stored_response(earlier)
                assert replay is not None
                return Idempotent(replay, replayed=True)
        response = create()
        if request is not None:
            idempotency_record(request=request, response=response)
    return Idempotent(response, replayed=False)


def idempotency_prune(*, now: datetime | None = None) -> int:
    """Delete every expired key; how many."""
    cutoff = (now or timezone.now()) - KEEP
    deleted, _ = IdempotencyKey.objects.filter(created_at__lt=cutoff).delete()
    return deleted
