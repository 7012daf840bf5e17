"""Writes of billing: accounts on first need, API keys, and the usage ledger."""

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.utils import timezone

from agentsite.cache import cache_versioned_get
from agentsite.errors import ApplicationError
from agentsite.text import UNSTORABLE

from .cache import BILLING_CACHE
from .models import Account, ApiKey, Membership, Plan
from .quotas import AccountQuotas, account_limits

logger = logging.getLogger(__name__)


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


def account_quotas_for_user(*, user_id: int) -> AccountQuotas:
    """The user's account and the limits in force for it (`account_for_user`), from the
    cache: what every chat message and signed-in API request needs before it is let in,
    without the query that joins membership, account and plan."""

    def read() -> AccountQuotas:
        account = account_for_user(user_id=user_id)
        return AccountQuotas(account_id=account.pk, limits=account_limits(account=account))

    return cache_versioned_get(group=BILLING_CACHE, key=f"quotas:{user_id}", read=read)


def _account_of(*, user_id: int) -> Account | None:
    membership = Membership.objects.select_related("account__plan").filter(user_id=user_id).first()
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


def api_key_name_clean(*, name: str) -> str:
    """The name as stored: stripped; a blank or unstorable one is refused."""
    name = name.strip()
    if not name or UNSTORABLE.search(name):
        raise ApplicationError(
            "invalid_name",
            "A key's name must not be blank, nor hold a NUL character or an unpaired surrogate.",
        )
    return name


def api_key_expiry_clean(*, expires_at: datetime | None) -> datetime | None:
    """A key made to expire must expire in the future: one already expired is a mistake."""
    if expires_at is not None and expires_at <= timezone.now():
        raise ApplicationError("invalid_expires_at", "A key's expiry must be in the future.")
    return expires_at


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
    name = api_key_name_clean(name=name)
    expires_at = api_key_expiry_clean(expires_at=expires_at)
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
    """The key `raw_key` names, if it may be used now; else a 401 error: `api_key_revoked`,
    `api_key_expired`, or `invalid_api_key` for anything else.

    Why a key is refused (revoked, expired) is said only once the caller has shown the
    whole secret: a prefix alone is not secret and must not reveal a key's state."""
    invalid = ApplicationError("invalid_api_key", "The API key is not valid.", http_status=401)
    if not _API_KEY_RE.fullmatch(raw_key):
        raise invalid
    api_key = (
        ApiKey.objects.select_related("created_by__membership", "account__plan")
        .filter(prefix=raw_key[:_API_KEY_PREFIX_LEN])
        .first()
    )
    if api_key is None or not hmac.compare_digest(api_key.key_hash, _api_key_hash(raw_key)):
        raise invalid
    now = timezone.now()
    if api_key.revoked_at is not None:
        raise ApplicationError("api_key_revoked", "The API key has been revoked.", http_status=401)
    if api_key.expires_at is not None and api_key.expires_at <= now:
        raise ApplicationError(
            "api_key_expired",
            f"The API key expired at {api_key.expires_at.isoformat()}.",
            http_status=401,
        )
    if not api_key.created_by.is_active:
        raise invalid
    # A key acts as its user within its account; a user moved to another account must
    # not carry the old account's keys into it (nor spend the new one's budget).
    membership = getattr(api_key.created_by, "membership", None)
    if membership is None or membership.account_id != api_key.account_id:
        raise ApplicationError(
            "invalid_api_key",
            "The API key's user no longer belongs to the key's account.",
            http_status=401,
        )
    if api_key.last_used_at is None or now - api_key.last_used_at >= API_KEY_LAST_USED_EVERY:
        api_key.last_used_at = now
        # update(), not save(): concurrent requests must not rewrite other fields (a
        # revocation that landed after our read).
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
    return api_key
