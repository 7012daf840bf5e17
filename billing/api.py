"""The billing endpoints of the JSON API."""

from dataclasses import asdict
from datetime import timedelta
from typing import Any, cast

from django.http import HttpRequest
from django.utils import timezone
from ninja import Query, Router

from .auth import api_key_require_scope
from .schemas import UsageOut, UsageParams
from .selectors import daily_usage, usage_summary
from .services import account_for_user

router = Router(tags=["usage"])


@router.get("/usage", response=UsageOut)
def usage(request: HttpRequest, params: Query[UsageParams]) -> dict[str, Any]:
    """The caller's account: today's and this month's spend and tokens against its
    limits (days and months are UTC), and its spend per day: this month's, or the last
    `days` days'."""
    api_key_require_scope(request, "usage")
    # Only an authenticated user gets this far (the API's auth), so pk is set.
    account = account_for_user(user_id=cast(int, request.user.pk))
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
