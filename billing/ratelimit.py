"""Requests per minute, per account and per API key (the limits come from quotas.py).

Counted with the `limits` library: in this process's memory by default, in Redis (shared
by every instance) when AGENT_REDIS_URL is set.

The strategy is a moving window: a request is allowed if fewer than N were allowed in
the 60 seconds before it. It is exact, so no 60 s span ever holds more than N requests,
even for a burst of parallel ones (each check-and-count is one atomic step: a Lua script
in Redis, a lock in memory). A fixed window allows 2N across a window edge, and the
sliding window counter only approximates the previous window's share; the moving
window's price is one timestamp per allowed request (at most N per limit), which is
small at per-minute limits.
"""

import functools
import logging
import math
import time

from django.conf import settings
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from agentsite.errors import ApplicationError

from .models import Account, ApiKey
from .quotas import AccountLimits, AccountQuotas, account_limits
from .services import account_quotas_for_user

# Redis keys are "agentsite:ratelimit:rpm/<account|key>/<id>/<N>/1/minute". N is part
# of the key, so a changed limit starts counting afresh.
logger = logging.getLogger(__name__)

KEY_PREFIX = "agentsite:ratelimit"
NAMESPACE = "rpm"


class RateLimitExceeded(ApplicationError):
    """Over a requests-per-minute limit; `retry_after` is whole seconds until one more
    request would be allowed (the API sends it as the Retry-After header)."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__("rate_limited", message, http_status=429, retry_after=retry_after)
        self.retry_after = retry_after


@functools.cache
def limiter_build(storage_uri: str) -> MovingWindowRateLimiter:
    """The limiter on `storage_uri` (memory://, redis://...), built once per process."""
    options = settings.REDIS_CLIENT_OPTIONS if storage_uri.startswith("redis") else {}
    return MovingWindowRateLimiter(
        storage_from_string(storage_uri, key_prefix=KEY_PREFIX, **options)
    )


def get_limiter() -> MovingWindowRateLimiter:
    return limiter_build(settings.REDIS_URL or "memory://")


def rate_limit_hit(*, account: Account, api_key: ApiKey | None = None) -> None:
    """Count one request against `api_key`'s own limit (if a key was used), then against
    `account`'s; raise `RateLimitExceeded` for the first limit it would exceed.

    A refused request is not counted against the limit that refused it, so a client
    that keeps retrying is not locked out for longer. A request the key's limit refuses
    is not counted against the account either: the key limit exists so that one runaway
    program cannot use up what the account's other keys and sessions share. A request
    the account's limit refuses has already counted against its key: the key did send
    it, and a moving window cannot take a count back."""
    in_force = account_limits(account=account)
    limiter = get_limiter()
    if api_key is not None and in_force.requests_per_minute_per_key:
        item = RateLimitItemPerMinute(in_force.requests_per_minute_per_key, namespace=NAMESPACE)
        _hit(limiter, item, ("key", str(api_key.pk)), whose="this API key")
    _account_hit(limiter, account_id=account.pk, limits=in_force)


def rate_limit_hit_for_user(*, user_id: int) -> AccountQuotas:
    """`rate_limit_hit` for a request made as a signed-in user (a session, the chat).
    Returns the account and limits it counted against, for the work it lets in."""
    quotas = account_quotas_for_user(user_id=user_id)
    _account_hit(get_limiter(), account_id=quotas.account_id, limits=quotas.limits)
    return quotas


def _account_hit(
    limiter: MovingWindowRateLimiter, *, account_id: int, limits: AccountLimits
) -> None:
    if limits.requests_per_minute_per_account:
        item = RateLimitItemPerMinute(limits.requests_per_minute_per_account, namespace=NAMESPACE)
        _hit(limiter, item, ("account", str(account_id)), whose="this account")


def _hit(
    limiter: MovingWindowRateLimiter, item: RateLimitItem, identifiers: tuple[str, ...], whose: str
) -> None:
    try:
        if limiter.hit(item, *identifiers):
            return
    except Exception:
        # Fail open: the money is guarded by the budget in the database; a Redis outage
        # must not also take the API and the chat down. Logged, so it is seen.
        logger.exception("rate limiter unavailable; request let through uncounted")
        return
    # The window is full: the next request fits once its oldest entry is 60 s old.
    reset_at = limiter.get_window_stats(item, *identifiers).reset_time
    retry_after = max(1, math.ceil(reset_at - time.time()))
    raise RateLimitExceeded(
        f"Too many requests: {whose} allows {item.amount} per minute. "
        f"Try again in {retry_after} second{'s' if retry_after != 1 else ''}.",
        retry_after=retry_after,
    )
