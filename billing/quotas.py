"""An account's effective limits: its own overrides, else its plan's, else the defaults
from settings. Pure reads; enforcement lives in budget.py (money, tokens, runs) and
ratelimit.py (requests per minute)."""

from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings

from .models import Account, Quotas


@dataclass(frozen=True)
class AccountLimits:
    """None means no limit."""

    money_per_day_usd: Decimal | None = None
    money_per_month_usd: Decimal | None = None
    money_per_run_usd: Decimal | None = None
    tokens_per_day: int | None = None
    requests_per_minute_per_account: int | None = None
    requests_per_minute_per_key: int | None = None
    concurrent_runs: int | None = None


@dataclass(frozen=True)
class AccountQuotas:
    """The account a user spends from, and the limits in force for it."""

    account_id: int
    limits: AccountLimits


def account_limits(*, account: Account) -> AccountLimits:
    """The limits in force for `account` (its `plan` should be select_related)."""
    values = {}
    for name in Quotas.QUOTA_FIELDS:
        value = getattr(account, name)
        if value is None and account.plan is not None:
            value = getattr(account.plan, name)
        values[name] = value
    # The deployment's floor against request floods, for accounts whose plan sets none.
    if values["requests_per_minute_per_account"] is None:
        values["requests_per_minute_per_account"] = settings.AGENT_RATE_LIMIT_PER_MINUTE or None
    return AccountLimits(**values)
