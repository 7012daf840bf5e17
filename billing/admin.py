"""Operators manage plans, accounts (and their limits), API keys and prices here, and
read (never edit) the usage ledger, the daily counters and the calls in flight."""

import math
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.template.loader import render_to_string

from agentsite.admin import ReadOnlyAdmin
from agentsite.errors import ApplicationError
from agentsite.formatting import format_count, format_usd

from .cache import billing_cache_invalidate
from .models import (
    Account,
    ApiKey,
    BudgetReservation,
    DailySpend,
    Membership,
    ModelPrice,
    Plan,
    Quotas,
    UsageRecord,
)
from .quotas import account_limits
from .selectors import DayUsage, accounts_with_spend, daily_usage, usage_summary, utc_day_bounds
from .services import (
    account_for_user,
    api_key_create,
    api_key_expiry_clean,
    api_key_revoke,
    api_key_scopes_clean,
)

CHART_DAYS = 30
# The chart's drawing box (SVG user units; the picture scales to the page's width).
_WIDTH, _HEIGHT = 720, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 18, 28


def spend_chart(*, days: list[DayUsage], limit: Decimal | None) -> dict[str, Any]:
    """The geometry of a bar chart of `days` (one bar each, scaled so the tallest bar or
    the daily `limit`, whichever is higher, reaches the top), for spend_chart.html."""
    plot_width = _WIDTH - _LEFT - _RIGHT
    plot_height = _HEIGHT - _TOP - _BOTTOM
    baseline = _TOP + plot_height
    top = max([day.cost_usd for day in days] + [limit or Decimal(0)])

    def y_of(amount: Decimal) -> float:
        return baseline - (float(amount / top) * plot_height if top else 0.0)

    slot = plot_width / max(len(days), 1)
    bars = []
    for index, day in enumerate(days):
        height = baseline - y_of(day.cost_usd)
        if day.cost_usd > 0:
            height = max(height, 1.0)  # a cent next to dollars still shows
        title = (
            f"{day.day:%a %d %b %Y}: {format_usd(day.cost_usd)}, "
            f"{format_count(day.calls)} call{'s' if day.calls != 1 else ''}, "
            f"{format_count(day.input_tokens)} in / {format_count(day.output_tokens)} out tokens"
        )
        if day.unpriced_calls:
            title += f"; {format_count(day.unpriced_calls)} unpriced, not in the cost"
        bars.append(
            {
                "slot_x": f"{_LEFT + index * slot:.2f}",
                "slot_width": f"{slot:.2f}",
                "x": f"{_LEFT + index * slot + slot * 0.14:.2f}",
                "y": f"{baseline - height:.2f}",
                "width": f"{slot * 0.72:.2f}",
                "height": f"{height:.2f}",
                "unpriced": day.unpriced_calls > 0,
                "center_x": f"{_LEFT + (index + 0.5) * slot:.2f}",
                "title": title,
            }
        )
    # About six date labels, counted back from the last day so that today has one.
    step = max(math.ceil(len(days) / 6), 1)
    labels = [
        {"x": f"{_LEFT + (index + 0.5) * slot:.2f}", "text": f"{day.day:%b} {day.day.day}"}
        for index, day in enumerate(days)
        if (len(days) - 1 - index) % step == 0
    ]
    ticks = [
        {"y": f"{y_of(amount):.2f}", "label": format_usd(amount)}
        for amount in ((top, top / 2) if top else ())
    ]
    return {
        "width": _WIDTH,
        "height": _HEIGHT,
        "left": _LEFT,
        "right": _WIDTH - _RIGHT,
        "baseline": f"{baseline:.2f}",
        "label_y": _HEIGHT - 8,
        "bars": bars,
        "labels": labels,
        "ticks": ticks,
        "limit": None
        if limit is None
        else {"y": f"{y_of(limit):.2f}", "label": f"daily limit {format_usd(limit)}"},
        "total": format_usd(sum((day.cost_usd for day in days), Decimal(0))),
        "calls": format_count(sum(day.calls for day in days)),
        "unpriced_calls": sum(day.unpriced_calls for day in days),
    }


def _spent_of_limit(spent: Decimal, reserved: Decimal, limit: Decimal | None) -> str:
    text = format_usd(spent)
    if reserved:
        text += f" + {format_usd(reserved)} in flight"
    return text if limit is None else f"{text} of {format_usd(limit)}"


def _limit_text(value: Decimal | int | None) -> str:
    if value is None:
        return "no limit"
    return format_usd(value) if isinstance(value, Decimal) else format_count(value)


class DropsBillingCache(admin.ModelAdmin):
    """For what the billing cache holds (limits, memberships, prices): every change an
    operator saves or deletes here reaches the next turn (`billing_cache_invalidate`)."""

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        billing_cache_invalidate()

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)  # an account's memberships
        billing_cache_invalidate()

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        super().delete_model(request, obj)
        billing_cache_invalidate()

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        super().delete_queryset(request, queryset)
        billing_cache_invalidate()


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ("user",)
    readonly_fields = ("created_at",)


def _limit_column(
    name: str, description: str, blank: str = "no limit"
) -> Callable[[Any, Quotas], str]:
    """A changelist column for the quota field `name`, short enough that all seven fit."""

    @admin.display(description=description, ordering=name)
    def column(model_admin: Any, quotas: Quotas) -> str:
        value = getattr(quotas, name)
        return blank if value is None else _limit_text(value)

    return column


@admin.register(Plan)
class PlanAdmin(DropsBillingCache):
    list_display = (
        "name",
        "default",
        "per_day",
        "per_month",
        "per_run",
        "tokens",
        "rpm_account",
        "rpm_key",
        "runs",
        "account_count",
    )
    search_fields = ("name",)
    fieldsets = (
        (None, {"fields": ("name", "is_default")}),
        ("Limits — blank means no limit", {"fields": Quotas.QUOTA_FIELDS}),
    )

    per_day = _limit_column("money_per_day_usd", "$ / day")
    per_month = _limit_column("money_per_month_usd", "$ / month")
    per_run = _limit_column("money_per_run_usd", "$ / run")
    tokens = _limit_column("tokens_per_day", "Tokens / day")
    rpm_account = _limit_column(
        "requests_per_minute_per_account",
        "Req / min (account)",
        blank=f"site default ({settings.AGENT_RATE_LIMIT_PER_MINUTE or 'none'})",
    )
    rpm_key = _limit_column("requests_per_minute_per_key", "Req / min (key)")
    runs = _limit_column("concurrent_runs", "Runs at once")

    @admin.display(description="Default", boolean=True, ordering="is_default")
    def default(self, plan: Plan) -> bool:
        return plan.is_default

    def get_queryset(self, request: HttpRequest) -> QuerySet[Plan]:
        return super().get_queryset(request).annotate(account_total=Count("accounts"))

    @admin.display(description="Accounts", ordering="account_total")
    def account_count(self, plan: Plan) -> int:
        return plan.account_total  # type: ignore[attr-defined]


@admin.register(Account)
class AccountAdmin(DropsBillingCache):
    list_display = ("name", "plan", "member_count", "spend_today", "spend_this_month", "created_at")
    list_filter = ("plan",)
    list_select_related = ("plan",)
    search_fields = ("name", "memberships__user__username")
    inlines = (MembershipInline,)
    readonly_fields = ("created_at", "effective_limits", "usage_now", "daily_spend_chart")
    fieldsets = (
        (None, {"fields": ("name", "plan", "created_at")}),
        (
            "Limits — blank uses the plan's",
            {
                "fields": Quotas.QUOTA_FIELDS,
                "description": "Set a field to override the plan for this account only.",
            },
        ),
        (
            "Usage (UTC days and months)",
            {"fields": ("effective_limits", "usage_now", "daily_spend_chart")},
        ),
    )

    def get_fieldsets(self, request: HttpRequest, obj: Account | None = None) -> Any:
        if obj is None:  # nothing spent yet: no usage section on the add page
            return self.fieldsets[:2]
        return self.fieldsets

    def get_queryset(self, request: HttpRequest) -> QuerySet[Account]:
        queryset = super().get_queryset(request).select_related("plan")
        queryset = queryset.annotate(member_total=Count("memberships", distinct=True))
        return accounts_with_spend(queryset=queryset)

    @admin.display(description="Members", ordering="member_total")
    def member_count(self, account: Account) -> int:
        return account.member_total  # type: ignore[attr-defined]

    @admin.display(description="Spent today", ordering="spent_today_usd")
    def spend_today(self, account: Account) -> str:
        return _spent_of_limit(
            account.spent_today_usd,  # type: ignore[attr-defined]
            account.reserved_today_usd,  # type: ignore[attr-defined]
            account_limits(account=account).money_per_day_usd,
        )

    @admin.display(description="Spent this month", ordering="spent_month_usd")
    def spend_this_month(self, account: Account) -> str:
        return _spent_of_limit(
            account.spent_month_usd,  # type: ignore[attr-defined]
            account.reserved_month_usd,  # type: ignore[attr-defined]
            account_limits(account=account).money_per_month_usd,
        )

    @admin.display(description="Limits in force")
    def effective_limits(self, account: Account) -> str:
        limits = account_limits(account=account)
        rows = []
        for name in Quotas.QUOTA_FIELDS:
            value = getattr(limits, name)
            if getattr(account, name) is not None:
                source = "this account"
            elif account.plan is not None and getattr(account.plan, name) is not None:
                source = f"plan {account.plan}"
            elif value is not None:
                source = "site default"
            else:
                source = ""
            rows.append(
                {
                    "label": Account._meta.get_field(name).verbose_name,  # type: ignore[union-attr]
                    "value": _limit_text(value),
                    "source": source,
                }
            )
        return render_to_string("admin/billing/account/limits.html", {"rows": rows})

    @admin.display(description="Spend and tokens")
    def usage_now(self, account: Account) -> str:
        summary = usage_summary(account=account)
        periods = [("Today", summary.day), ("This month", summary.month)]
        return render_to_string(
            "admin/billing/account/usage.html",
            {
                "periods": [
                    {
                        "label": label,
                        "spent": format_usd(period.spent_usd),
                        "reserved": format_usd(period.reserved_usd),
                        "limit": _limit_text(period.limit_usd),
                        "remaining": _limit_text(period.remaining_usd),
                        "resets_at": period.resets_at,
                    }
                    for label, period in periods
                ],
                "tokens": {
                    "used": format_count(summary.tokens_today.used),
                    "reserved": format_count(summary.tokens_today.reserved),
                    "limit": _limit_text(summary.tokens_today.limit),
                    "remaining": _limit_text(summary.tokens_today.remaining),
                    "resets_at": summary.day.resets_at,
                },
            },
        )

    @admin.display(description=f"Daily spend, last {CHART_DAYS} days")
    def daily_spend_chart(self, account: Account) -> str:
        until = utc_day_bounds()[0].date()
        days = daily_usage(
            account=account, since=until - timedelta(days=CHART_DAYS - 1), until=until
        )
        chart = spend_chart(days=days, limit=account_limits(account=account).money_per_day_usd)
        return render_to_string("admin/billing/account/spend_chart.html", {"chart": chart})


@admin.register(ModelPrice)
class ModelPriceAdmin(DropsBillingCache):
    list_display = (
        "model",
        "input_per_mtok",
        "cached_input_per_mtok",
        "output_per_mtok",
        "active",
        "updated_at",
    )
    list_editable = ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok", "active")
    list_filter = ("active",)
    search_fields = ("model",)


class PricedFilter(admin.SimpleListFilter):
    """Unpriced calls are a to-do for operators (add the model's price), not free usage."""

    title = "priced"
    parameter_name = "priced"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "Unpriced (price missing)"), ("yes", "Priced")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "no":
            return queryset.filter(price_missing=True)
        if self.value() == "yes":
            return queryset.filter(price_missing=False)
        return queryset


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    # The ledger is append-only: no adding, editing or deleting rows by hand.
    list_display = (
        "created_at",
        "account",
        "user",
        "api_key",
        "model",
        "input_tokens",
        "cached_tokens",
        "output_tokens",
        "cost",
        "price_missing",
        "usage_estimated",
        "run_id",
        "span_id",
    )
    list_filter = (PricedFilter, "usage_estimated", "model", "account", "created_at")
    search_fields = (
        "model",
        "account__name",
        "user__username",
        "api_key_prefix",
        "run_id",
        "span_id",
    )
    list_select_related = ("account", "user")
    date_hierarchy = "created_at"

    @admin.display(description="Cost", ordering="cost_usd")
    def cost(self, record: UsageRecord) -> str:
        return "price unknown" if record.cost_usd is None else format_usd(record.cost_usd)

    @admin.display(description="API key", ordering="api_key_prefix")
    def api_key(self, record: UsageRecord) -> str:
        """Which key caused the call: its prefix, as the key list shows it."""
        return f"{record.api_key_prefix}…" if record.api_key_id is not None else "browser"


@admin.register(DailySpend)
class DailySpendAdmin(ReadOnlyAdmin):
    """The counters limits are checked against; only billing.budget moves them."""

    list_display = (
        "day",
        "account",
        "spent_usd",
        "reserved_usd",
        "tokens_spent",
        "tokens_reserved",
    )
    list_filter = ("account", "day")
    search_fields = ("account__name",)
    list_select_related = ("account",)
    date_hierarchy = "day"
    ordering = ("-day", "account__name")


@admin.register(BudgetReservation)
class BudgetReservationAdmin(ReadOnlyAdmin):
    """Calls in flight. One that outlives its run by much is a leak to look into (a
    process that died before releasing it)."""

    list_display = (
        "created_at",
        "account",
        "day",
        "model",
        "amount_usd",
        "tokens",
        "run_id",
        "id",
    )
    list_filter = ("account", "day", "model")
    search_fields = ("account__name", "run_id", "id", "model")
    list_select_related = ("account",)
    date_hierarchy = "created_at"
    ordering = ("-created_at",)


class ApiKeyForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=ApiKey.Scope.choices, widget=forms.CheckboxSelectMultiple
    )

    class Meta:
        model = ApiKey
        fields = ("created_by", "name", "scopes", "expires_at")

    def clean_scopes(self) -> list[str]:
        try:
            return api_key_scopes_clean(scopes=self.cleaned_data["scopes"])
        except ApplicationError as error:
            raise forms.ValidationError(error.message) from error

    def clean_expires_at(self) -> datetime | None:
        expires_at: datetime | None = self.cleaned_data["expires_at"]
        # A key that has expired may still be edited (renamed) as it is.
        if "expires_at" not in self.changed_data:
            return expires_at
        try:
            return api_key_expiry_clean(expires_at=expires_at)
        except ApplicationError as error:
            raise forms.ValidationError(error.message) from error


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are created through `api_key_create` (the raw key is shown once, in the
    success message, never stored) and revoked, not edited: the hash is never shown."""

    form = ApiKeyForm
    list_display = (
        "prefix",
        "name",
        "account",
        "created_by",
        "scope_list",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    )
    list_filter = ("revoked_at", "expires_at", "account")
    search_fields = ("prefix", "name", "account__name", "created_by__username")
    list_select_related = ("account", "created_by")
    autocomplete_fields = ("created_by",)
    actions = ("revoke_selected",)

    @admin.display(description="Scopes")
    def scope_list(self, api_key: ApiKey) -> str:
        return ", ".join(api_key.scopes)

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        if obj is None:
            # The key's account is its user's account, so the two cannot disagree.
            return ("created_by", "name", "scopes", "expires_at")
        return (
            "prefix",
            "name",
            "account",
            "created_by",
            "scopes",
            "expires_at",
            "created_at",
            "last_used_at",
            "revoked_at",
        )

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        if obj is None:
            return ()
        return ("prefix", "account", "created_by", "created_at", "last_used_at", "revoked_at")

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        api_key, raw_key = api_key_create(
            account=account_for_user(user_id=obj.created_by_id),
            created_by=obj.created_by,
            name=obj.name,
            scopes=obj.scopes,
            expires_at=obj.expires_at,
        )
        # The admin goes on with `obj` (log entry, redirect): make it the created row.
        for model_field in ApiKey._meta.concrete_fields:
            setattr(obj, model_field.attname, getattr(api_key, model_field.attname))
        obj._state.adding = False
        messages.success(
            request,
            f"API key {api_key.prefix}… created. Copy it now, it will not be shown again: "
            f"{raw_key}",
        )

    @admin.action(description="Revoke selected keys")
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        keys = list(queryset.filter(revoked_at__isnull=True))
        for api_key in keys:
            api_key_revoke(api_key=api_key)
        self.message_user(request, f"Revoked {len(keys)} key(s).", messages.SUCCESS)
