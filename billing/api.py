"""The billing endpoints of the JSON API."""

from dataclasses import asdict
from datetime import timedelta
from typing import Any

from django.http import HttpRequest
from django.utils import timezone
from ninja import Query, Router

from agentsite.api_errors import errors
from agentsite.auth import require_scope

from .schemas import UsageOut, UsageParams
from .selectors import account_get, daily_usage, usage_summary

router = Router(tags=["usage"])


@router.get("/usage", response={200: UsageOut, **errors(401, 403, 422, 429)})
def usage(request: HttpRequest, params: Query[UsageParams]) -> dict[str, Any]:
    """The caller's account: today's and this month's spend and tokens against its
    limits (days and months are UTC), and its spend per day: this month's, or the last
    `days` days'."""
    account = account_get(account_id=require_scope(request, "usage").account_id)
    now = timezone.now()
    summary = usage_summary(account=account, now=now)
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
        "days": daily_usage(account=account, since=since, until=today),
    }
