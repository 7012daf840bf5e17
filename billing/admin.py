"""Operators manage accounts, API keys and prices here, and read (never edit) the usage
ledger."""

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from agentsite.admin import ReadOnlyAdmin
from agentsite.errors import ApplicationError
from tracing.formatting import format_usd

from .models import Account, ApiKey, Membership, ModelPrice, UsageRecord
from .selectors import account_spend, month_start
from .services import account_for_user, api_key_create, api_key_revoke, api_key_scopes_clean


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
class UsageRecordAdmin(ReadOnlyAdmin):
    # The ledger is append-only: no adding, editing or deleting rows by hand.
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
