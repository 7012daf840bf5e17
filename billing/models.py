"""Who pays (accounts), under which limits (plans, per-account overrides), what a model
costs (prices), what is spent (the ledger) and what is promised to calls in flight
(reservations against each account's daily counters)."""

from django.conf import settings
from django.db import models

from agentsite import auth


class Quotas(models.Model):
    """The limits a plan sets and an account may override. Blank means no limit on a
    plan, and "the plan's" on an account. Days and months are UTC."""

    money_per_day_usd = models.DecimalField(
        "money per day ($)", max_digits=16, decimal_places=8, null=True, blank=True
    )
    money_per_month_usd = models.DecimalField(
        "money per month ($)", max_digits=16, decimal_places=8, null=True, blank=True
    )
    money_per_run_usd = models.DecimalField(
        "money per run ($)", max_digits=16, decimal_places=8, null=True, blank=True
    )
    tokens_per_day = models.PositiveBigIntegerField(null=True, blank=True)
    requests_per_minute_per_account = models.PositiveIntegerField(
        "requests per minute (account)", null=True, blank=True
    )
    requests_per_minute_per_key = models.PositiveIntegerField(
        "requests per minute (each API key)", null=True, blank=True
    )
    concurrent_runs = models.PositiveIntegerField(null=True, blank=True)

    QUOTA_FIELDS = (
        "money_per_day_usd",
        "money_per_month_usd",
        "money_per_run_usd",
        "tokens_per_day",
        "requests_per_minute_per_account",
        "requests_per_minute_per_key",
        "concurrent_runs",
    )

    class Meta:
        abstract = True


class Plan(Quotas):
    """A named set of limits. New accounts get the default plan (if one is marked)."""

    name = models.CharField(max_length=100, unique=True)
    is_default = models.BooleanField(
        "default for new accounts",
        default=False,
        help_text="Personal accounts made on a user's first visit get this plan.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"],
                condition=models.Q(is_default=True),
                name="billing_one_default_plan",
            )
        ]

    def __str__(self) -> str:
        return self.name


class Account(Quotas):
    """A tenant: the party that is billed. Every user belongs to exactly one; a user who
    has none gets a personal account on first need (`account_for_user`). Its limits are
    its plan's, except where a field here is set (an override)."""

    name = models.CharField(max_length=200)
    # PROTECT: a plan in use cannot be deleted out from under its accounts.
    plan = models.ForeignKey(
        Plan, on_delete=models.PROTECT, null=True, blank=True, related_name="accounts"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    """The user → account link. One account per user (the issue's "users belong to
    one"); an account has many members."""

    class Role(models.TextChoices):
        OWNER = "owner"
        MEMBER = "member"

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="membership"
    )
    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.user} in {self.account}"


class ApiKey(models.Model):
    """A credential for programs calling the JSON API on behalf of a user of an account.

    Only `prefix` (the visible start of the key, used to find the row) and a hash of the
    whole key are stored; the key itself is shown once by `api_key_create`. The hash is
    a plain SHA-256: the secret is 32 random bytes, so there is nothing to brute-force
    and a slow password hash (or a per-row salt) would add latency to every request for
    no gain; unlike an HMAC keyed with SECRET_KEY, it survives a SECRET_KEY rotation."""

    # The API's scopes are defined on the ground floor, where every router reads them.
    Scope = auth.Scope

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="api_keys")
    # The key acts as this user (what it may see is what they own); a key outliving its
    # user would act as nobody, so it goes with them.
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="api_keys",
        verbose_name="user",
        help_text="The key acts as this user: it sees what they own.",
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Updated at most once a minute (services.api_key_verify), not on every request.
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name})"


class ModelPrice(models.Model):
    """USD per million tokens for a model name or a glob pattern of names.

    Matching (billing.pricing.price_for_model): an active row whose `model` equals the
    name exactly wins; otherwise, among active glob patterns (fnmatch, case-sensitive)
    that match, the most specific one wins — the one with the most literal (non-wildcard)
    characters, so "gpt-4.1-mini*" beats "gpt-4.1*" for "gpt-4.1-mini-2025-04-14".
    """

    model = models.CharField(
        max_length=200,
        unique=True,
        help_text='An exact model name ("gpt-4.1") or a glob ("gpt-4.1*").',
    )
    input_per_mtok = models.DecimalField("input $/Mtok", max_digits=12, decimal_places=6)
    output_per_mtok = models.DecimalField("output $/Mtok", max_digits=12, decimal_places=6)
    # Null: the provider has no cached-input discount, cached tokens cost the input rate.
    cached_input_per_mtok = models.DecimalField(
        "cached input $/Mtok", max_digits=12, decimal_places=6, null=True, blank=True
    )
    active = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model"]

    def __str__(self) -> str:
        return self.model


class UsageRecord(models.Model):
    """The usage ledger: one row per LLM call, append-only.

    Nothing updates or deletes rows: there is no service for it and the admin is
    read-only. So nothing may reference a row that could change under it either:
    `run_id` and `span_id` are plain UUIDs, not foreign keys, because the ledger outlives
    the conversations (and their runs and traces) that users delete, and a SET_NULL
    would rewrite money records. `run_id` joins chat.Run and tracing.Trace (whose id is
    the run id), `span_id` the LLM call's tracing.Span.
    """

    # PROTECT: an account with spend on record cannot vanish with its history.
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="usage")
    # SET_NULL only when a user account is erased; the spend stays on the account.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="usage",
    )
    run_id = models.UUIDField(db_index=True)
    # The API key whose request started the run; null for the browser (and rows from
    # before keys were recorded). A plain id and the key's prefix, not a foreign key,
    # for the reason above: keys go with their users, and neither CASCADE nor SET_NULL
    # may rewrite money records. The prefix still names the key once it is gone.
    api_key_id = models.PositiveBigIntegerField("API key id", null=True, blank=True)
    api_key_prefix = models.CharField("API key", max_length=16, blank=True)
    # The call's id, which is its LLM span's id (no span matches with tracing off).
    # Null only on rows from before calls were recorded one by one.
    span_id = models.UUIDField(null=True, blank=True)
    model = models.CharField(max_length=200)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    # Part of input_tokens served from the provider's prompt cache.
    cached_tokens = models.PositiveIntegerField(default=0)
    # Null when no price matched the model: unpriced, which is not free.
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, null=True, blank=True)
    price_missing = models.BooleanField(default=False)
    # The provider reported no usage (or not all of it) and the tokens are our estimate:
    # the prompt estimate and the output as streamed. Billed all the same, never free.
    usage_estimated = models.BooleanField(
        default=False,
        help_text="The provider did not report this call's usage: its tokens are estimated.",
    )
    # The worst case held for the call before it was made: how good the estimate was.
    reserved_usd = models.DecimalField(max_digits=14, decimal_places=8, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["account", "-created_at"]),
            models.Index(fields=["model", "-created_at"]),
        ]
        constraints = [
            # A call is recorded once, however often its run's finish is retried.
            models.UniqueConstraint(
                fields=["span_id"],
                condition=models.Q(span_id__isnull=False),
                name="usage_one_record_per_span",
            )
        ]

    def __str__(self) -> str:
        return f"{self.model} {self.input_tokens}+{self.output_tokens} tokens (run {self.run_id})"


class DailySpend(models.Model):
    """An account's running totals for one UTC day: the counters quotas are checked
    against, so a check reads one month of small rows instead of summing the ledger.

    `spent_usd`/`tokens_spent` move only together with the ledger (a call's row is
    written in the same transaction), `reserved_*` is what calls in flight may still
    cost at most. Both belong to the day the call was reserved on."""

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="daily_spend")
    day = models.DateField()
    spent_usd = models.DecimalField(max_digits=16, decimal_places=8, default=0)
    reserved_usd = models.DecimalField(max_digits=16, decimal_places=8, default=0)
    tokens_spent = models.PositiveBigIntegerField(default=0)
    tokens_reserved = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "day"], name="billing_one_row_per_day")
        ]

    def __str__(self) -> str:
        return f"{self.account} on {self.day}"


class BudgetReservation(models.Model):
    """The worst case of one LLM call in flight, held against its account's budget from
    before the call until it is settled into the ledger. Its id is the call's id (the
    LLM span's id), so a reservation left behind by a crashed process can be found and
    released with its run."""

    id = models.UUIDField(primary_key=True)
    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="reservations")
    # Whom the call's ledger row will name.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    run_id = models.UUIDField(db_index=True)
    # What the call's ledger row will name as its API key (see UsageRecord).
    api_key_id = models.PositiveBigIntegerField(null=True, blank=True)
    api_key_prefix = models.CharField(max_length=16, blank=True)
    day = models.DateField()
    model = models.CharField(max_length=200)
    amount_usd = models.DecimalField(max_digits=14, decimal_places=8)
    # The estimated prompt, billed as the input of a call cut short after it streamed.
    prompt_tokens = models.PositiveIntegerField()
    tokens = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.amount_usd} USD for run {self.run_id}"

    @property
    def output_tokens(self) -> int:
        """The output the call may produce (its `max_tokens`): what the budget granted."""
        return self.tokens - self.prompt_tokens
