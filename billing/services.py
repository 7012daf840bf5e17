"""Writes of billing: accounts on first need, API keys, and the usage ledger."""

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from uuid import UUID

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.utils import timezone

from agentsite.errors import ApplicationError
from chat.models import Run

from .models import Account, ApiKey, Membership, ModelPrice, Plan, UsageRecord
from .pricing import cost_of, price_for_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlmCall:
    """One LLM call's usage as the run saw it. `span_id` is its LLM span (None when the
    run was not traced); `reported` is False for a call that stopped before the provider
    reported its usage (a cancel, a failure, the deadline)."""

    span_id: UUID | None
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reported: bool = True


@dataclass
class RunCost:
    """What a run's calls cost: the total (None if any call is unpriced) and each
    traced call's cost by span id, for the trace."""

    total_usd: Decimal | None
    span_costs: dict[UUID, Decimal | None] = field(default_factory=dict)


def account_for_user(*, user_id: int) -> Account:
    """The user's account, created (a personal one) on first need. Race-safe: two first
    requests at once both end up with the one account the unique user link allows."""
    account = _account_of(user_id=user_id)
    if account is not None:
        return account
    user = get_user_model().objects.get(pk=user_id)
    try:
        with transaction.atomic():
            account = Account.objects.create(
                name=user.get_username(), plan=Plan.objects.filter(is_default=True).first()
            )
            Membership.objects.create(user=user, account=account, role=Membership.Role.OWNER)
            return account
    except IntegrityError:
        return Membership.objects.select_related("account__plan").get(user_id=user_id).account


def _account_of(*, user_id: int) -> Account | None:
    membership = (
        Membership.objects.select_related("account__plan").filter(user_id=user_id).first()
    )
    return membership.account if membership is not None else None


# A key reads "ak_<8 hex>_<43 url-safe chars>": the first 11 characters are the stored,
# visible prefix; the rest is 32 random bytes. A fixed shape lets malformed keys be
# refused before any query.
_API_KEY_RE = re.compile(r"ak_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")
_API_KEY_PREFIX_LEN = len("ak_") + 8
# Writing last_used_at on every request would turn each API read into a write.
API_KEY_LAST_USED_EVERY = timedelta(minutes=1)


def _api_key_hash(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_scopes_clean(*, scopes: Sequence[str]) -> list[str]:
    """The scopes as stored (known, unique, sorted); an unknown or empty set is refused."""
    cleaned = sorted({scope.strip() for scope in scopes if scope.strip()})
    unknown = [scope for scope in cleaned if scope not in ApiKey.Scope.values]
    if unknown or not cleaned:
        raise ApplicationError(
            "invalid_scopes",
            f"Scopes must be one or more of: {', '.join(ApiKey.Scope.values)}"
            + (f" (unknown: {', '.join(unknown)})." if unknown else "."),
        )
    return cleaned


def api_key_create(
    *,
    account: Account,
    created_by: User,
    name: str,
    scopes: Sequence[str],
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A new key for `account`, acting as `created_by`, and the raw key: the only time
    it exists outside the caller's hands. Only its prefix and hash are stored."""
    if not Membership.objects.filter(user_id=created_by.pk, account=account).exists():
        raise ApplicationError(
            "invalid_request", f"{created_by} is not a member of the account {account}."
        )
    cleaned_scopes = api_key_scopes_clean(scopes=scopes)
    # 32 bits of prefix: a collision is rare but possible, so retry rather than fail.
    for _ in range(5):
        prefix = f"ak_{secrets.token_hex(4)}"
        raw_key = f"{prefix}_{secrets.token_urlsafe(32)}"
        try:
            with transaction.atomic():
                api_key = ApiKey.objects.create(
                    account=account,
                    created_by=created_by,
                    name=name,
                    prefix=prefix,
                    key_hash=_api_key_hash(raw_key),
                    scopes=cleaned_scopes,
                    expires_at=expires_at,
                )
            return api_key, raw_key
        except IntegrityError:
            continue
    raise RuntimeError("Could not find a free API key prefix.")


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Refuse the key from now on. Revoking twice keeps the first revocation time."""
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def api_key_verify(*, raw_key: str) -> ApiKey:
    """The key `raw_key` names, if it may be used now; else an `invalid_api_key` error.

    Why a key is refused (revoked, expired) is said only once the caller has shown the
    whole secret: a prefix alone is not secret and must not reveal a key's state."""
    invalid = ApplicationError("invalid_api_key", "The API key is not valid.", http_status=401)
    if not _API_KEY_RE.fullmatch(raw_key):
        raise invalid
    api_key = (
        ApiKey.objects.select_related("created_by", "account")
        .filter(prefix=raw_key[:_API_KEY_PREFIX_LEN])
        .first()
    )
    if api_key is None or not hmac.compare_digest(api_key.key_hash, _api_key_hash(raw_key)):
        raise invalid
    now = timezone.now()
    if api_key.revoked_at is not None:
        raise ApplicationError("invalid_api_key", "The API key has been revoked.", http_status=401)
    if api_key.expires_at is not None and api_key.expires_at <= now:
        raise ApplicationError(
            "invalid_api_key",
            f"The API key expired at {api_key.expires_at.isoformat()}.",
            http_status=401,
        )
    if not api_key.created_by.is_active:
        raise invalid
    if api_key.last_used_at is None or now - api_key.last_used_at >= API_KEY_LAST_USED_EVERY:
        api_key.last_used_at = now
        # update(), not save(): concurrent requests must not rewrite other fields (a
        # revocation that landed after our read).
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
    return api_key


def usage_calls_reconcile(
    *,
    calls: Sequence[LlmCall],
    model: str,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
) -> list[LlmCall]:
    """The calls to bill for a run whose totals (what the user was shown) are given.

    Usage the calls do not account for — a call stopped mid-stream, whose output the
    run estimated from the chunks it streamed, or every call of an untraced run — is
    billed to the last call that never reported its own, else as one call without a
    span. So the ledger never bills less than the run shows."""
    result = list(calls)
    missing = (
        max(input_tokens - sum(c.input_tokens for c in result), 0),
        max(output_tokens - sum(c.output_tokens for c in result), 0),
        max(cached_tokens - sum(c.cached_tokens for c in result), 0),
    )
    if not any(missing):
        return result
    for index in range(len(result) - 1, -1, -1):
        call = result[index]
        if not call.reported:
            result[index] = LlmCall(
                span_id=call.span_id,
                model=call.model,
                input_tokens=call.input_tokens + missing[0],
                output_tokens=call.output_tokens + missing[1],
                cached_tokens=call.cached_tokens + missing[2],
                reported=False,
            )
            return result
    result.append(LlmCall(None, model, *missing, reported=False))
    return result


def usage_record_run(*, run_id: UUID, user_id: int, calls: Sequence[LlmCall]) -> RunCost:
    """Price a finished run's LLM calls, append them to the ledger and store the run's
    cost, in one transaction. An unknown price never makes a call free: its tokens are
    recorded, its cost is null and flagged `price_missing`, and a warning is logged."""
    account = account_for_user(user_id=user_id)
    prices: dict[str, ModelPrice | None] = {}
    records = []
    span_costs: dict[UUID, Decimal | None] = {}
    for call in calls:
        if call.model not in prices:
            prices[call.model] = price_for_model(model=call.model)
            if prices[call.model] is None:
                logger.warning(
                    "run %s: no price for model %r; its usage is recorded unpriced "
                    "(add a ModelPrice in the admin)",
                    run_id,
                    call.model,
                )
        price = prices[call.model]
        cost = (
            cost_of(
                price=price,
                input_tokens=call.input_tokens,
                output_tokens=call.output_tokens,
                cached_tokens=call.cached_tokens,
            )
            if price is not None
            else None
        )
        records.append(
            UsageRecord(
                account=account,
                user_id=user_id,
                run_id=run_id,
                span_id=call.span_id,
                model=call.model,
                input_tokens=call.input_tokens,
                output_tokens=call.output_tokens,
                cached_tokens=call.cached_tokens,
                cost_usd=cost,
                price_missing=price is None,
            )
        )
        if call.span_id is not None:
            span_costs[call.span_id] = cost
    costs = [r.cost_usd for r in records]
    total = None if None in costs else sum((c for c in costs if c is not None), Decimal(0))
    with transaction.atomic():
        UsageRecord.objects.bulk_create(records)
        Run.objects.filter(id=run_id).update(cost_usd=total)
    return RunCost(total_usd=total, span_costs=span_costs)
