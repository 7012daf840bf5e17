from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from uuid import uuid4

import pytest
from django.test import Client
from django.utils import timezone

from billing.models import DailySpend, Plan, UsageRecord
from billing.selectors import daily_usage, usage_summary, utc_today
from billing.services import account_for_user, api_key_create

pytestmark = pytest.mark.django_db

HEADER = "X-API-Key"


def client_for(user):
    client = Client()
    client.force_login(user)
    return client


def spend(account, day, spent="0", reserved="0", tokens_spent=0, tokens_reserved=0):
    return DailySpend.objects.create(
        account=account,
        day=day,
        spent_usd=Decimal(spent),
        reserved_usd=Decimal(reserved),
        tokens_spent=tokens_spent,
        tokens_reserved=tokens_reserved,
    )


def ledger(account, at, cost, *, input_tokens=100, output_tokens=20, model="m"):
    record = UsageRecord.objects.create(
        account=account,
        run_id=uuid4(),
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=None if cost is None else Decimal(cost),
        price_missing=cost is None,
    )
    # created_at is auto_now_add: move the row to the day the test needs.
    UsageRecord.objects.filter(pk=record.pk).update(created_at=at)
    return record


def noon(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)


@pytest.fixture
def alice(make_user):
    user = make_user("alice")
    account = account_for_user(user_id=user.id)
    plan = Plan.objects.create(
        name="Team",
        money_per_day_usd=Decimal("2"),
        money_per_month_usd=Decimal("10"),
        money_per_run_usd=Decimal("0.5"),
        tokens_per_day=1000,
        requests_per_minute_per_key=30,
        concurrent_runs=3,
    )
    account.plan = plan
    account.money_per_day_usd = Decimal("3")  # the account's override beats the plan's 2
    account.save(update_fields=["plan", "money_per_day_usd"])
    return user, account


def test_usage_reports_todays_and_this_months_counters_against_the_limits(alice):
    user, account = alice
    today = utc_today()
    yesterday = today - timedelta(days=1)
    spend(account, today, "1.25", "0.5", tokens_spent=400, tokens_reserved=100)
    spend(account, yesterday, "2")
    spend(account, today.replace(day=1) - timedelta(days=1), "99")  # last month's

    response = client_for(user).get("/api/v1/usage")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["account"] == account.name and body["plan"] == "Team"
    tomorrow = today + timedelta(days=1)
    assert body["day"] == {
        "start": f"{today.isoformat()}T00:00:00Z",
        "resets_at": f"{tomorrow.isoformat()}T00:00:00Z",
        "spent_usd": "1.25000000",
        "reserved_usd": "0.50000000",
        "limit_usd": "3.00000000",
        "remaining_usd": "1.25000000",  # 3 - 1.25 spent - 0.5 in flight
    }
    # Yesterday belongs to this month unless today is the 1st.
    month_spent = Decimal("3.25") if yesterday.month == today.month else Decimal("1.25")
    next_month = (today.replace(day=1) + timedelta(days=32)).replace(day=1)
    assert body["month"] == {
        "start": f"{today.replace(day=1).isoformat()}T00:00:00Z",
        "resets_at": f"{next_month.isoformat()}T00:00:00Z",
        "spent_usd": f"{month_spent:.8f}",
        "reserved_usd": "0.50000000",
        "limit_usd": "10.00000000",
        "remaining_usd": f"{Decimal(10) - month_spent - Decimal('0.5'):.8f}",
    }
    assert body["tokens_today"] == {"used": 400, "reserved": 100, "limit": 1000, "remaining": 500}
    assert body["limits"] == {
        "money_per_day_usd": "3.00000000",
        "money_per_month_usd": "10.00000000",
        "money_per_run_usd": "0.50000000",
        "tokens_per_day": 1000,
        "requests_per_minute_per_account": 60,  # the plan sets none: the site's default
        "requests_per_minute_per_key": 30,
        "concurrent_runs": 3,
    }


def test_remaining_never_goes_below_zero_and_is_null_without_a_limit(alice, make_user):
    user, account = alice
    spend(account, utc_today(), "2.9", "0.2", tokens_spent=990, tokens_reserved=20)
    body = client_for(user).get("/api/v1/usage").json()
    assert body["day"]["remaining_usd"] == "0.00000000"
    assert body["tokens_today"]["remaining"] == 0

    unlimited = make_user("unlimited")
    free_account = account_for_user(user_id=unlimited.id)
    free_account.plan = Plan.objects.create(name="Unlimited")
    free_account.save(update_fields=["plan"])
    spend(free_account, utc_today(), "7")
    body = client_for(unlimited).get("/api/v1/usage").json()
    assert body["day"]["spent_usd"] == "7.00000000"
    assert body["day"]["limit_usd"] is None and body["day"]["remaining_usd"] is None
    assert body["month"]["limit_usd"] is None and body["month"]["remaining_usd"] is None
    assert body["tokens_today"]["limit"] is None and body["tokens_today"]["remaining"] is None


def test_days_come_from_the_ledger_with_empty_days_as_zeros(alice):
    user, account = alice
    today = utc_today()
    ledger(account, noon(today), "0.01", input_tokens=100, output_tokens=20)
    ledger(account, noon(today), None, input_tokens=7, output_tokens=3, model="mystery")
    ledger(account, noon(today - timedelta(days=2)), "0.5", input_tokens=1000, output_tokens=50)
    ledger(account, noon(today - timedelta(days=3)), "4")  # before the window

    body = client_for(user).get("/api/v1/usage?days=3").json()

    assert body["days"] == [
        {
            "day": (today - timedelta(days=2)).isoformat(),
            "cost_usd": "0.50000000",
            "input_tokens": 1000,
            "output_tokens": 50,
            "calls": 1,
            "unpriced_calls": 0,
        },
        {
            "day": (today - timedelta(days=1)).isoformat(),
            "cost_usd": "0.00000000",
            "input_tokens": 0,
            "output_tokens": 0,
            "calls": 0,
            "unpriced_calls": 0,
        },
        {
            "day": today.isoformat(),
            "cost_usd": "0.01000000",  # the unpriced call is counted, not priced at $0
            "input_tokens": 107,
            "output_tokens": 23,
            "calls": 2,
            "unpriced_calls": 1,
        },
    ]


def test_days_default_to_the_current_month(alice):
    user, account = alice
    today = utc_today()
    ledger(account, noon(today.replace(day=1) - timedelta(days=1)), "1")  # last month
    days = client_for(user).get("/api/v1/usage").json()["days"]
    assert [day["day"] for day in days] == [
        (today.replace(day=1) + timedelta(days=n)).isoformat() for n in range(today.day)
    ]
    assert all(day["calls"] == 0 for day in days)


@pytest.mark.parametrize("days", ["0", "91", "-1", "week"])
def test_a_bad_days_parameter_is_a_422_in_the_api_error_shape(alice, days):
    user, _ = alice
    response = client_for(user).get(f"/api/v1/usage?days={days}")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["details"][0]["loc"][-1] == "days"


def test_the_largest_window_is_accepted(alice):
    user, _ = alice
    response = client_for(user).get("/api/v1/usage?days=90")
    assert response.status_code == 200
    assert len(response.json()["days"]) == 90


def test_an_api_key_needs_the_usage_scope(alice):
    user, account = alice
    spend(account, utc_today(), "1")
    _, usage_key = api_key_create(account=account, created_by=user, name="u", scopes=["usage"])
    _, traces_key = api_key_create(account=account, created_by=user, name="t", scopes=["traces"])

    response = Client().get("/api/v1/usage", headers={HEADER: usage_key})
    assert response.status_code == 200, response.content
    assert response.json()["day"]["spent_usd"] == "1.00000000"

    response = Client().get("/api/v1/usage", headers={HEADER: traces_key})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"


def test_anonymous_callers_are_refused(db):
    response = Client().get("/api/v1/usage")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


def test_another_accounts_spend_never_appears(alice, make_user):
    user, account = alice
    bob = make_user("bob")
    bobs_account = account_for_user(user_id=bob.id)
    today = utc_today()
    spend(bobs_account, today, "4", "1", tokens_spent=500, tokens_reserved=50)
    ledger(bobs_account, noon(today), "4")
    _, bobs_key = api_key_create(account=bobs_account, created_by=bob, name="b", scopes=["usage"])

    for body in (
        client_for(user).get("/api/v1/usage?days=1").json(),
        Client().get("/api/v1/usage?days=1", headers={HEADER: bobs_key}).json(),
    ):
        mine = body["account"] == account.name
        assert body["day"]["spent_usd"] == ("0.00000000" if mine else "4.00000000")
        assert body["month"]["reserved_usd"] == ("0.00000000" if mine else "1.00000000")
        assert body["tokens_today"]["used"] == (0 if mine else 500)
        assert body["days"][0]["calls"] == (0 if mine else 1)
    assert client_for(user).get("/api/v1/usage").json()["account"] == "alice"


# The selectors, at fixed times: period edges are where date arithmetic goes wrong.


def test_the_summary_periods_are_utc_and_roll_over_at_month_and_year_ends(alice):
    _, account = alice
    spend(account, date(2025, 12, 31), "1")
    spend(account, date(2026, 1, 1), "5")  # tomorrow, from where `now` stands
    spend(account, date(2025, 11, 30), "7")
    # 01:30 on Jan 1st in UTC+2 is still Dec 31st in UTC.
    now = datetime(2026, 1, 1, 1, 30, tzinfo=timezone.get_fixed_timezone(120))

    summary = usage_summary(account=account, now=now)

    assert summary.day.start == datetime(2025, 12, 31, tzinfo=UTC)
    assert summary.day.resets_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert summary.month.start == datetime(2025, 12, 1, tzinfo=UTC)
    assert summary.month.resets_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert summary.day.spent_usd == summary.month.spent_usd == Decimal(1)


def test_the_summary_is_one_query_for_an_account_with_its_plan(alice, django_assert_num_queries):
    user, account = alice
    spend(account, utc_today(), "1")
    account = account_for_user(user_id=user.id)  # as the callers get it: plan joined
    with django_assert_num_queries(1):
        summary = usage_summary(account=account)
    assert summary.day.spent_usd == Decimal(1)


def test_daily_usage_groups_by_utc_day(alice):
    _, account = alice
    ledger(account, datetime(2025, 3, 1, 23, 59, tzinfo=UTC), "1")
    ledger(account, datetime(2025, 3, 2, 0, 0, tzinfo=UTC), "2")
    # 01:00 at UTC+2 on Mar 3rd is 23:00 UTC on Mar 2nd.
    ledger(account, datetime(2025, 3, 3, 1, 0, tzinfo=timezone.get_fixed_timezone(120)), "4")

    days = daily_usage(account=account, since=date(2025, 3, 1), until=date(2025, 3, 3))

    assert [(d.day.day, d.cost_usd, d.calls) for d in days] == [
        (1, Decimal(1), 1),
        (2, Decimal(6), 2),
        (3, Decimal(0), 0),
    ]
    assert daily_usage(account=account, since=date(2025, 3, 3), until=date(2025, 3, 1)) == []
