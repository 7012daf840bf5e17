import re
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.admin import spend_chart
from billing.models import (
    Account,
    BudgetReservation,
    DailySpend,
    Membership,
    ModelPrice,
    Plan,
    Quotas,
    UsageRecord,
)
from billing.pricing import price_for_model
from billing.ratelimit import RateLimitExceeded, rate_limit_hit_for_user
from billing.selectors import DayUsage, utc_today
from billing.services import account_for_user, account_quotas_for_user


def ledger(account, *, day, cost, model="agentsite-offline-demo", **tokens):
    record = UsageRecord.objects.create(
        account=account,
        run_id=uuid.uuid4(),
        model=model,
        input_tokens=tokens.get("input_tokens", 100),
        output_tokens=tokens.get("output_tokens", 20),
        cost_usd=None if cost is None else Decimal(cost),
        price_missing=cost is None,
    )
    at = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    UsageRecord.objects.filter(pk=record.pk).update(created_at=at)
    return record


def chart_of(html: str) -> str:
    start = html.index('<svg class="daily-spend"')
    return html[start : html.index("</svg>", start)]


@pytest.fixture
def admin_client(client, db):
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    return client


@pytest.fixture
def account_with_usage(make_user, prices):
    """An account on a plan with a $5 daily limit, with a ledger and counters for today
    (a priced and an unpriced call, one call in flight) and a priced call 3 days ago."""
    user = make_user()
    account = account_for_user(user_id=user.id)
    account.plan = Plan.objects.create(
        name="Small", money_per_day_usd=Decimal("5"), money_per_month_usd=Decimal("50")
    )
    account.save(update_fields=["plan"])
    today = utc_today()
    # 100 * 0.40/M + 20 * 1.60/M, the demo model's seeded price.
    ledger(account, day=today, cost="0.000072")
    ledger(account, day=today, cost=None, model="mystery", input_tokens=5, output_tokens=5)
    ledger(account, day=today - timedelta(days=3), cost="1.5")
    DailySpend.objects.create(
        account=account, day=today, spent_usd=Decimal("0.000072"), reserved_usd=Decimal("0.25")
    )
    BudgetReservation.objects.create(
        id=uuid.uuid4(),
        account=account,
        user=user,
        run_id=uuid.uuid4(),
        day=today,
        model="agentsite-offline-demo",
        amount_usd=Decimal("0.25"),
        prompt_tokens=10,
        tokens=1000,
    )
    return account


def test_billing_admin_pages_load(admin_client, account_with_usage):
    account = account_with_usage
    for name in (
        "plan",
        "account",
        "modelprice",
        "usagerecord",
        "dailyspend",
        "budgetreservation",
        "apikey",
    ):
        response = admin_client.get(reverse(f"admin:billing_{name}_changelist"))
        assert response.status_code == 200, name
    for url in (
        reverse("admin:billing_plan_change", args=[account.plan_id]),
        reverse("admin:billing_plan_add"),
        reverse("admin:billing_account_add"),
        reverse("admin:billing_usagerecord_change", args=[UsageRecord.objects.first().id]),
        reverse("admin:billing_modelprice_change", args=[ModelPrice.objects.first().id]),
        reverse("admin:billing_dailyspend_change", args=[DailySpend.objects.get().id]),
        reverse(
            "admin:billing_budgetreservation_change", args=[BudgetReservation.objects.get().id]
        ),
    ):
        assert admin_client.get(url).status_code == 200, url


def test_the_account_page_shows_limits_spend_and_a_daily_chart(admin_client, account_with_usage):
    account = account_with_usage
    page = admin_client.get(reverse("admin:billing_account_change", args=[account.id]))

    assert page.status_code == 200
    html = page.content.decode()
    assert "Limits — blank uses the plan&#x27;s" in html
    assert "plan Small" in html  # where the $5 daily limit comes from
    assert "$0.000072" in html  # today's spend, from the counters
    assert "$0.2500" in html  # in flight
    assert "$4.75" in html  # left today: 5 - 0.000072 - 0.25, rounded to cents
    chart = chart_of(html)
    assert len(re.findall(r'<rect class="bar', chart)) == 30
    assert len(re.findall(r'<rect class="bar unpriced"', chart)) == 1  # today's
    assert chart.count('class="limit"') == 1 and "daily limit $5.00" in chart
    today = utc_today()
    assert f"{today:%a %d %b %Y}: $0.000072, 2 calls, 105 in / 25 out tokens; 1 unpriced" in chart
    assert f"{today - timedelta(days=3):%a %d %b %Y}: $1.50, 1 call," in chart


def test_the_chart_has_no_limit_line_without_a_daily_limit(admin_client, account_with_usage):
    account = account_with_usage
    account.plan = Plan.objects.create(name="Unlimited")
    account.save(update_fields=["plan"])
    page = admin_client.get(reverse("admin:billing_account_change", args=[account.id]))
    chart = chart_of(page.content.decode())
    assert 'class="limit"' not in chart
    assert len(re.findall(r'<rect class="bar', chart)) == 30


def test_bars_scale_to_the_tallest_day_or_the_limit():
    days = [
        DayUsage(date(2025, 3, n), Decimal(cost), 0, 0, 1 if cost else 0, 0)
        for n, cost in ((1, "1"), (2, "0"), (3, "4"))
    ]
    chart = spend_chart(days=days, limit=Decimal("2"))
    baseline = float(chart["baseline"])
    heights = [float(bar["height"]) for bar in chart["bars"]]
    assert heights[2] == pytest.approx(baseline - 18)  # the tallest reaches the top
    assert heights[0] == pytest.approx(heights[2] / 4) and heights[1] == 0
    assert float(chart["limit"]["y"]) == pytest.approx(baseline - heights[2] / 2)

    # A limit above every day sets the scale: the bars show how close each came to it.
    chart = spend_chart(days=days, limit=Decimal("8"))
    assert float(chart["limit"]["y"]) == pytest.approx(18)
    assert float(chart["bars"][2]["height"]) == pytest.approx((baseline - 18) / 2)

    # Nothing spent and no limit: flat bars, no division by zero.
    chart = spend_chart(days=[DayUsage(date(2025, 3, 1), Decimal(0), 0, 0, 0, 0)], limit=None)
    assert chart["bars"][0]["height"] == "0.00" and chart["limit"] is None


def test_the_account_list_shows_spend_against_limits(admin_client, account_with_usage):
    response = admin_client.get(reverse("admin:billing_account_changelist"))
    html = response.content.decode()
    assert "$0.000072 + $0.2500 in flight of $5.00" in html  # today
    assert "$0.000072 + $0.2500 in flight of $50.00" in html  # this month (the counters)


def test_the_account_list_filters_by_plan(admin_client, account_with_usage, make_user):
    other = account_for_user(user_id=make_user("bob").id)
    url = reverse("admin:billing_account_changelist")
    response = admin_client.get(f"{url}?plan__id__exact={account_with_usage.plan_id}")
    assert list(response.context["cl"].queryset) == [account_with_usage]
    assert other.plan_id != account_with_usage.plan_id


def test_the_account_list_costs_the_same_queries_for_many_accounts(
    admin_client, account_with_usage, make_user, django_assert_max_num_queries
):
    url = reverse("admin:billing_account_changelist")

    def queries() -> int:
        with CaptureQueriesContext(connection) as context:
            assert admin_client.get(url).status_code == 200
        return len(context.captured_queries)

    few = queries()
    for n in range(25):
        user = make_user(f"user{n}")
        account = account_for_user(user_id=user.id)
        Membership.objects.create(user=make_user(f"member{n}"), account=account)
        DailySpend.objects.create(account=account, day=utc_today(), spent_usd=Decimal(n))
    assert queries() == few
    with django_assert_max_num_queries(10):
        admin_client.get(url)


def test_the_plan_list_shows_limits_and_the_default(admin_client, account_with_usage):
    # The migration seeds it, but a transactional test run earlier in the same process
    # (the suite runs in two workers) empties the table: made here, not assumed.
    default, _ = Plan.objects.update_or_create(name="Default", defaults={"is_default": True})
    response = admin_client.get(reverse("admin:billing_plan_changelist"))
    html = response.content.decode()
    assert "Small" in html and "no limit" in html
    assert default.name in html


@pytest.mark.parametrize(
    "query, expected",
    [
        ("priced=no", ["mystery"]),
        ("model=mystery", ["mystery"]),
        ("priced=yes", ["agentsite-offline-demo", "agentsite-offline-demo"]),
    ],
)
def test_operators_can_filter_the_ledger(admin_client, account_with_usage, query, expected):
    url = reverse("admin:billing_usagerecord_changelist")
    response = admin_client.get(f"{url}?{query}")
    assert response.status_code == 200
    assert sorted(response.context["cl"].queryset.values_list("model", flat=True)) == expected


def test_the_ledger_shows_which_api_key_caused_each_row(admin_client, account_with_usage):
    keyed = ledger(account_with_usage, day=utc_today(), cost="7")
    UsageRecord.objects.filter(pk=keyed.pk).update(api_key_id=41, api_key_prefix="ak_0badc0de")
    url = reverse("admin:billing_usagerecord_changelist")
    page = admin_client.get(url).content.decode()
    assert "ak_0badc0de…" in page and "browser" in page
    found = admin_client.get(f"{url}?q=ak_0badc0de")
    assert [r.pk for r in found.context["cl"].queryset] == [keyed.pk]


def test_the_ledger_filters_by_account_and_date(admin_client, account_with_usage, make_user):
    other = account_for_user(user_id=make_user("bob").id)
    ledger(other, day=utc_today(), cost="9")
    url = reverse("admin:billing_usagerecord_changelist")
    response = admin_client.get(f"{url}?account__id__exact={other.id}")
    assert list(response.context["cl"].queryset.values_list("cost_usd", flat=True)) == [
        Decimal("9")
    ]
    earlier = utc_today() - timedelta(days=3)
    response = admin_client.get(
        f"{url}?created_at__year={earlier.year}&created_at__month={earlier.month}"
        f"&created_at__day={earlier.day}"
    )
    assert list(response.context["cl"].queryset.values_list("cost_usd", flat=True)) == [
        Decimal("1.5")
    ]


def test_the_counters_filter_by_account(admin_client, account_with_usage, make_user):
    other = account_for_user(user_id=make_user("bob").id)
    DailySpend.objects.create(account=other, day=utc_today(), spent_usd=Decimal(3))
    url = reverse("admin:billing_dailyspend_changelist")
    response = admin_client.get(f"{url}?account__id__exact={other.id}")
    assert [row.account for row in response.context["cl"].queryset] == [other]


@pytest.mark.parametrize("name", ["usagerecord", "dailyspend", "budgetreservation"])
def test_records_cannot_be_edited_in_the_admin(admin_client, account_with_usage, name):
    model = {"usagerecord": UsageRecord, "dailyspend": DailySpend}.get(name, BudgetReservation)
    row = model.objects.first()
    assert admin_client.get(reverse(f"admin:billing_{name}_add")).status_code == 403
    response = admin_client.post(reverse(f"admin:billing_{name}_change", args=[row.pk]), {})
    assert response.status_code == 403
    assert (
        admin_client.get(reverse(f"admin:billing_{name}_delete", args=[row.pk])).status_code == 403
    )
    assert model.objects.filter(pk=row.pk).exists()
    assert Account.objects.count() == 1


def test_the_ledger_shows_and_filters_estimated_usage(admin_client, make_user, prices):
    account = account_for_user(user_id=make_user().id)
    reported = ledger(account, day=utc_today(), cost="0.0001")
    estimated = ledger(account, day=utc_today(), cost="0.0002", input_tokens=777)
    UsageRecord.objects.filter(pk=estimated.pk).update(usage_estimated=True)
    url = reverse("admin:billing_usagerecord_changelist")

    listed = admin_client.get(url).content.decode()
    only_estimated = admin_client.get(url, {"usage_estimated__exact": "1"}).content.decode()

    assert "Usage estimated" in listed
    row = "/billing/usagerecord/{}/change/"
    assert row.format(estimated.pk) in only_estimated
    assert row.format(reported.pk) not in only_estimated


def quota_form(plan_or_account, **changes):
    """The change form's fields as the admin would post them back, with `changes`."""
    data = {"name": plan_or_account.name}
    for name in Quotas.QUOTA_FIELDS:
        value = getattr(plan_or_account, name)
        data[name] = "" if value is None else str(value)
    data.update({name: str(value) for name, value in changes.items()})
    return data


def test_a_plan_limit_an_operator_lowers_holds_from_the_next_request(admin_client, make_user):
    user = make_user()
    account = account_for_user(user_id=user.id)
    account.plan = Plan.objects.create(name="Busy", requests_per_minute_per_account=5)
    account.save(update_fields=["plan"])
    rate_limit_hit_for_user(user_id=user.id)  # the limits are cached from here on

    response = admin_client.post(
        reverse("admin:billing_plan_change", args=[account.plan_id]),
        quota_form(account.plan, requests_per_minute_per_account=1),
    )

    assert response.status_code == 302
    rate_limit_hit_for_user(user_id=user.id)  # a new limit counts afresh
    with pytest.raises(RateLimitExceeded, match="allows 1 per minute"):
        rate_limit_hit_for_user(user_id=user.id)


def test_an_account_override_an_operator_sets_holds_from_the_next_run(admin_client, make_user):
    user = make_user()
    account = account_for_user(user_id=user.id)
    assert account_quotas_for_user(user_id=user.id).limits.concurrent_runs != 1
    membership = account.memberships.get()

    response = admin_client.post(
        reverse("admin:billing_account_change", args=[account.id]),
        {
            **quota_form(account, concurrent_runs=1),
            "plan": account.plan_id or "",
            "memberships-TOTAL_FORMS": "1",
            "memberships-INITIAL_FORMS": "1",
            "memberships-0-id": str(membership.id),
            "memberships-0-account": str(account.id),
            "memberships-0-user": str(user.id),
            "memberships-0-role": membership.role,
        },
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    assert account_quotas_for_user(user_id=user.id).limits.concurrent_runs == 1


def test_a_price_an_operator_edits_prices_the_next_call(admin_client, prices):
    before = price_for_model(model="agentsite-offline-demo")  # cached from here on
    price = ModelPrice.objects.get(model="agentsite-offline-demo")

    response = admin_client.post(
        reverse("admin:billing_modelprice_change", args=[price.id]),
        {
            "model": price.model,
            "input_per_mtok": "3.000000",
            "output_per_mtok": "9.000000",
            "cached_input_per_mtok": "",
            "active": "on",
        },
    )

    assert response.status_code == 302
    after = price_for_model(model="agentsite-offline-demo")
    assert before.input_per_mtok != Decimal(3)
    assert (after.input_per_mtok, after.output_per_mtok) == (Decimal(3), Decimal(9))


def test_a_price_an_operator_deactivates_is_gone_from_the_next_call(admin_client, prices):
    assert price_for_model(model="agentsite-offline-demo") is not None
    price = ModelPrice.objects.get(model="agentsite-offline-demo")

    response = admin_client.post(
        reverse("admin:billing_modelprice_delete", args=[price.id]), {"post": "yes"}
    )

    assert response.status_code == 302
    assert price_for_model(model="agentsite-offline-demo") is None
