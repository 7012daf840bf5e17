"""Reads of billing: an account's API keys; what an account has spent and may still spend.

Days and months are UTC, like the limits they are checked against."""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from django.db.models import Count, DecimalField, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from agentsite.auth import object_or_404
from agentsite.errors import ApplicationError

from .models import Account, ApiKey, DailySpend, Membership, UsageRecord
from .quotas import AccountLimits, account_limits


def account_get_owned(*, account_id: int, user_id: int) -> Account:
    """The account, if the user is its owner; a member who is not: 403 `not_account_owner`."""
    account = Account.objects.filter(
        pk=account_id, memberships__user_id=user_id, memberships__role=Membership.Role.OWNER
    ).first()
    if account is None:
        raise ApplicationError(
            "not_account_owner", "Only the account's owner may do this.", http_status=403
        )
    return account


def api_key_list(*, account: Account) -> QuerySet[ApiKey]:
    """The account's keys, revoked and expired ones too, newest first."""
    return ApiKey.objects.filter(account=account).order_by("-created_at", "-id")


def api_key_get(*, account: Account, api_key_id: int) -> ApiKey:
    """One of the account's keys; another account's is not found, like a missing one."""
    return object_or_404(ApiKey.objects.filter(account=account), name="API key", pk=api_key_id)


@dataclass(frozen=True)
class PeriodUsage:
    """Money in one budget period (a UTC day or month). `reserved_usd` is the worst case
    of the calls still in flight; `remaining_usd` is None when there is no limit."""

    start: datetime
    resets_at: datetime
    spent_usd: Decimal
    reserved_usd: Decimal
    limit_usd: Decimal | None
    remaining_usd: Decimal | None


@dataclass(frozen=True)
class TokenUsage:
    """Tokens today (UTC); `remaining` is None when there is no limit."""

    used: int
    reserved: int
    limit: int | None
    remaining: int | None


@dataclass(frozen=True)
class UsageSummary:
    day: PeriodUsage
    month: PeriodUsage
    tokens_today: TokenUsage
    limits: AccountLimits


@dataclass(frozen=True)
class DayUsage:
    """One UTC day of the ledger. `cost_usd` is the priced calls' cost: unpriced calls
    (counted in `unpriced_calls`) are not in it, which does not make them free."""

    day: date
    cost_usd: Decimal
    input_tokens: int
    output_tokens: int
    calls: int
    unpriced_calls: int


def account_get(*, account_id: int) -> Account:
    """An account with its plan (what its limits are read from)."""
    return Account.objects.select_related("plan").get(pk=account_id)


def utc_today() -> date:
    """The UTC date: the day budgets are counted on."""
    return _utc(None).date()


def utc_day_bounds(*, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The start of the UTC day `now` is in and the start of the next."""
    start = datetime.combine(_utc(now).date(), time.min, tzinfo=UTC)
    return start, start + timedelta(days=1)


def utc_month_bounds(*, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The start of the UTC month `now` is in and the start of the next."""
    today = _utc(now).date()
    start = datetime.combine(today.replace(day=1), time.min, tzinfo=UTC)
    following = (start + timedelta(days=32)).replace(day=1)
    return start, following


def usage_summary(*, account: Account, now: datetime | None = None) -> UsageSummary:
    """Today's and this month's spend against the account's limits, from the daily
    counters: one query (two if `account.plan` was not select_related)."""
    return usage_summary_of(account_id=account.pk, limits=account_limits(account=account), now=now)


def usage_summary_of(
    *, account_id: int, limits: AccountLimits, now: datetime | None = None
) -> UsageSummary:
    """`usage_summary` of the account with these limits, read by the caller: one query,
    for the month's daily counters."""
    day_start, day_end = utc_day_bounds(now=now)
    month_start, month_end = utc_month_bounds(now=now)
    today = day_start.date()
    # At most 31 small rows; summed here rather than in SQL, where SQLite would add
    # the decimals as floats.
    rows = DailySpend.objects.filter(
        account_id=account_id, day__gte=month_start.date(), day__lt=month_end.date()
    ).values_list("day", "spent_usd", "reserved_usd", "tokens_spent", "tokens_reserved")
    month_spent = month_reserved = day_spent = day_reserved = Decimal(0)
    tokens_used = tokens_reserved = 0
    for day, spent, reserved, row_tokens_spent, row_tokens_reserved in rows:
        month_spent += spent
        month_reserved += reserved
        if day == today:
            day_spent, day_reserved = spent, reserved
            tokens_used, tokens_reserved = row_tokens_spent, row_tokens_reserved
    return UsageSummary(
        day=_period(
            day_start,
            day_end,
            spent=day_spent,
            reserved=day_reserved,
            limit=limits.money_per_day_usd,
        ),
        month=_period(
            month_start,
            month_end,
            spent=month_spent,
            reserved=month_reserved,
            limit=limits.money_per_month_usd,
        ),
        tokens_today=TokenUsage(
            used=tokens_used,
            reserved=tokens_reserved,
            limit=limits.tokens_per_day,
            remaining=None
            if limits.tokens_per_day is None
            else max(limits.tokens_per_day - tokens_used - tokens_reserved, 0),
        ),
        limits=limits,
    )


def daily_usage(*, account: Account, since: date, until: date) -> list[DayUsage]:
    """The ledger per UTC day from `since` to `until` (both included), oldest first,
    days without calls as zeros. One query."""
    if since > until:
        return []
    start = datetime.combine(since, time.min, tzinfo=UTC)
    end = datetime.combine(until + timedelta(days=1), time.min, tzinfo=UTC)
    rows = (
        UsageRecord.objects.filter(account=account, created_at__gte=start, created_at__lt=end)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values("day")
        .annotate(
            cost=Sum("cost_usd"),
            input=Sum("input_tokens"),
            output=Sum("output_tokens"),
            calls=Count("id"),
            unpriced=Count("id", filter=Q(price_missing=True)),
        )
        .order_by("day")
    )
    by_day = {row["day"]: row for row in rows}
    days = []
    for offset in range((until - since).days + 1):
        day = since + timedelta(days=offset)
        row = by_day.get(day)
        days.append(
            DayUsage(
                day=day,
                cost_usd=(row["cost"] or Decimal(0)) if row else Decimal(0),
                input_tokens=row["input"] if row else 0,
                output_tokens=row["output"] if row else 0,
                calls=row["calls"] if row else 0,
                unpriced_calls=row["unpriced"] if row else 0,
            )
        )
    return days


def accounts_with_spend(
    *, queryset: QuerySet[Account], now: datetime | None = None
) -> QuerySet[Account]:
    """`queryset` with today's and this month's counters summed onto each account, as
    `spent_today_usd`, `reserved_today_usd`, `spent_month_usd`, `reserved_month_usd`
    (subqueries: a list of accounts costs one query, not one per row)."""
    day_start, _ = utc_day_bounds(now=now)
    month_start, month_end = utc_month_bounds(now=now)
    month = DailySpend.objects.filter(
        account=OuterRef("pk"), day__gte=month_start.date(), day__lt=month_end.date()
    )
    today = DailySpend.objects.filter(account=OuterRef("pk"), day=day_start.date())
    return queryset.annotate(
        spent_today_usd=_counter_sum(today, "spent_usd"),
        reserved_today_usd=_counter_sum(today, "reserved_usd"),
        spent_month_usd=_counter_sum(month, "spent_usd"),
        reserved_month_usd=_counter_sum(month, "reserved_usd"),
    )


def _counter_sum(rows: QuerySet[DailySpend], field: str) -> Coalesce:
    money = DecimalField(max_digits=16, decimal_places=8)
    total = rows.order_by().values("account").annotate(total=Sum(field)).values("total")
    return Coalesce(Subquery(total, output_field=money), Value(Decimal(0)), output_field=money)


def _utc(now: datetime | None) -> datetime:
    return (now or timezone.now()).astimezone(UTC)


def _period(
    start: datetime, end: datetime, *, spent: Decimal, reserved: Decimal, limit: Decimal | None
) -> PeriodUsage:
    return PeriodUsage(
        start=start,
        resets_at=end,
        spent_usd=spent,
        reserved_usd=reserved,
        limit_usd=limit,
        remaining_usd=None if limit is None else max(limit - spent - reserved, Decimal(0)),
    )
