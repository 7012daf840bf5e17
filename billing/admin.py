"""Operators manage accounts and prices here, and read (never edit) the usage ledger."""

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from tracing.formatting import format_usd

from .models import Account, Membership, ModelPrice, UsageRecord
from .selectors import account_spend, month_start


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ("user",)
    readonly_fields = ("created_at",)


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    list_display = ("name", "member_count", "spend_this_month", "created_at")
    search_fields = ("name", "memberships__user__username")
    inlines = (MembershipInline,)
    readonly_fields = ("created_at", "spend_this_month")

    @admin.display(description="Members")
    def member_count(self, account: Account) -> int:
        return account.memberships.count()

    @admin.display(description="Spend this month")
    def spend_this_month(self, account: Account) -> str:
        # Per row on the changelist: fine for an admin page of accounts (paginated).
        return format_usd(account_spend(account=account, since=month_start()))


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
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
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "account",
        "user",
        "model",
        "input_tokens",
        "cached_tokens",
        "output_tokens",
        "cost",
        "price_missing",
        "run_id",
        "span_id",
    )
    list_filter = (PricedFilter, "model", "account", "created_at")
    search_fields = ("model", "account__name", "user__username", "run_id", "span_id")
    list_select_related = ("account", "user")
    date_hierarchy = "created_at"

    @admin.display(description="Cost", ordering="cost_usd")
    def cost(self, record: UsageRecord) -> str:
        return "price unknown" if record.cost_usd is None else format_usd(record.cost_usd)

    # The ledger is append-only: no adding, editing or deleting rows by hand.
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
