"""Reads of billing."""

from datetime import datetime
from decimal import Decimal

from django.db.models import Sum
from django.utils import timezone

from .models import Account, UsageRecord


def month_start(*, now: datetime | None = None) -> datetime:
    now = timezone.localtime(now or timezone.now())
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def account_spend(*, account: Account, since: datetime) -> Decimal:
    """Priced spend since `since`. Unpriced calls are not in it: they are flagged
    `price_missing` for operators instead of being counted as free."""
    total = UsageRecord.objects.filter(account=account, created_at__gte=since).aggregate(
        total=Sum("cost_usd")
    )["total"]
    return total or Decimal(0)
