"""The billing endpoints of the JSON API: usage, and API-key management.

API keys are managed by the account's owner (403 `not_account_owner` for a member) from
a signed-in browser session only (403 `session_required` with a key): a key that could
mint keys could outlive its own revocation through them, and widen its own scopes."""

from dataclasses import asdict
from datetime import timedelta
from typing import Any, cast

from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from ninja import Query, Router

from agentsite.api_errors import errors
from agentsite.auth import Scope, principal, require_scope
from agentsite.errors import ApplicationError
from agentsite.idempotency.http import (
    idempotency_key_parameter,
    idempotent_request,
    json_response,
)
from agentsite.idempotency.services import StoredResponse, idempotent

from . import selectors, services
from .models import Account, ApiKey
from .schemas import (
    ApiKeyCreatedOut,
    ApiKeyCreateIn,
    ApiKeyListOut,
    ApiKeyOut,
    UsageOut,
    UsageParams,
)

router = Router(tags=["usage"])


@router.get("/usage", response={200: UsageOut, **errors(401, 403, 422, 429)})
def usage(request: HttpRequest, params: Query[UsageParams]) -> dict[str, Any]:
    """The caller's account: today's and this month's spend and tokens against its
    limits (days and months are UTC), and its spend per day: this month's, or the last
    `days` days'."""
    account = selectors.account_get(account_id=require_scope(request, Scope.USAGE).account_id)
    now = timezone.now()
    summary = selectors.usage_summary(account=account, now=now)
    today = summary.day.start.date()
    since = (
        summary.month.start.date()
        if params.days is None
        else today - timedelta(days=params.days - 1)
    )
    return {
        "account": account.name,
        "plan": account.plan.name if account.plan is not None else None,
        **asdict(summary),
        "days": selectors.daily_usage(account=account, since=since, until=today),
    }


def _owned_account(request: HttpRequest) -> Account:
    caller = principal(request)
    if caller.api_key_id is not None:
        raise ApplicationError(
            "session_required",
            "API keys are managed from a signed-in browser session, not with an API key.",
            http_status=403,
        )
    return selectors.account_get_owned(account_id=caller.account_id, user_id=caller.user_id)


@router.post(
    "/api-keys",
    response={201: ApiKeyCreatedOut, **errors(400, 401, 403, 413, 422, 429)},
    tags=["api keys"],
    openapi_extra={"parameters": [idempotency_key_parameter()]},
)
def api_key_create(request: HttpRequest, body: ApiKeyCreateIn) -> HttpResponse:
    """A new key for the caller's account, acting as the caller. The response is the
    only place the whole key (`key`) ever appears: a retry with the same Idempotency-Key
    creates no second key, and its replay has `key` null (the secret is kept nowhere)."""
    account = _owned_account(request)
    raw_keys = []

    def create() -> StoredResponse:
        api_key, raw_key = services.api_key_create(
            account=account,
            created_by=cast(User, request.user),
            name=body.name,
            scopes=body.scopes,
            expires_at=body.expires_at,
        )
        raw_keys.append(raw_key)
        # What the Idempotency-Key keeps, to replay: everything but the secret.
        return StoredResponse(201, {**_api_key_out(api_key), "key": None})

    keyed = idempotent_request(request, account_id=account.pk, caller=principal(request).user_id)
    outcome = idempotent(request=keyed, create=create)
    if outcome.replayed:
        return json_response(outcome.response, replayed=True)
    return json_response(
        StoredResponse(201, {**outcome.response.body, "key": raw_keys[0]}), replayed=False
    )


@router.get(
    "/api-keys", response={200: ApiKeyListOut, **errors(401, 403, 422, 429)}, tags=["api keys"]
)
def api_key_list(request: HttpRequest) -> dict[str, Any]:
    """The account's keys (every member's), revoked and expired ones too."""
    return {"items": list(selectors.api_key_list(account=_owned_account(request)))}


@router.post(
    "/api-keys/{api_key_id}/revoke",
    # 400/413: what the API answers any POST whose body (none is read here) is too big.
    response={200: ApiKeyOut, **errors(400, 401, 403, 404, 413, 422, 429)},
    tags=["api keys"],
)
def api_key_revoke(request: HttpRequest, api_key_id: int) -> ApiKey:
    """Refuse the key from now on. Revoking a revoked key changes nothing (its
    `revoked_at` stays the first revocation's)."""
    account = _owned_account(request)
    return services.api_key_revoke(
        api_key=selectors.api_key_get(account=account, api_key_id=api_key_id)
    )


def _api_key_out(api_key: ApiKey) -> dict[str, Any]:
    return {field: getattr(api_key, field) for field in ApiKeyOut.model_fields}
