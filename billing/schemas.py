from datetime import date, datetime
from decimal import Decimal
from typing import Annotated

from ninja import Field, Schema
from pydantic import AwareDatetime, PlainSerializer

from agentsite.auth import Scope
from agentsite.schemas import BodyIn

# Money is a decimal string with the ledger's 8 places ("0.00007200"), never a float,
# and never str(Decimal)'s exponent form: a zero read back from an 8-place column is
# Decimal("0E-8").
Usd = Annotated[Decimal, PlainSerializer(lambda value: f"{value:.8f}", return_type=str)]


class UsageParams(Schema):
    days: int | None = Field(
        None,
        ge=1,
        le=90,
        description="A trailing window of this many UTC days, today included, instead "
        "of the current month.",
    )


class PeriodOut(Schema):
    """A UTC day or month. `reserved_usd` is held by calls still in flight;
    `remaining_usd` is what the limit leaves after both (null: no limit)."""

    start: datetime
    resets_at: datetime
    spent_usd: Usd
    reserved_usd: Usd
    limit_usd: Usd | None
    remaining_usd: Usd | None


class TokensOut(Schema):
    used: int
    reserved: int
    limit: int | None
    remaining: int | None


class LimitsOut(Schema):
    """The limits in force (the account's own, else its plan's); null means none."""

    money_per_day_usd: Usd | None
    money_per_month_usd: Usd | None
    money_per_run_usd: Usd | None
    tokens_per_day: int | None
    requests_per_minute_per_account: int | None
    requests_per_minute_per_key: int | None
    concurrent_runs: int | None


class DayUsageOut(Schema):
    """One UTC day of the ledger; `cost_usd` leaves out the `unpriced_calls`."""

    day: date
    cost_usd: Usd
    input_tokens: int
    output_tokens: int
    calls: int
    unpriced_calls: int


class UsageOut(Schema):
    account: str
    plan: str | None
    day: PeriodOut
    month: PeriodOut
    tokens_today: TokensOut
    limits: LimitsOut
    days: list[DayUsageOut]


class ApiKeyCreateIn(BodyIn):
    name: str = Field(
        min_length=1,
        max_length=100,
        description="What the key is for, to tell keys apart. Leading and trailing "
        "whitespace is dropped; blank, or with a NUL character or an unpaired surrogate: "
        "400 `invalid_name`.",
    )
    scopes: list[Scope] = Field(
        min_length=1,
        description="What the key may do: `runs` (conversations and runs), `traces`, `usage`.",
    )
    expires_at: AwareDatetime | None = Field(
        None,
        description="When the key stops working; null: never. In the past: 400 "
        "`invalid_expires_at`.",
    )


class ApiKeyOut(Schema):
    """A key as its account's owner sees it: never its secret (nor its hash)."""

    id: int
    name: str
    # The key's first characters, as it starts: enough to recognise it.
    prefix: str
    scopes: list[str]
    created_at: datetime
    # To the minute (it is not written on every request).
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreatedOut(ApiKeyOut):
    key: str | None = Field(
        description="The whole key, for the API key header or `Authorization: Bearer`. "
        "Shown this once: only its prefix and a hash are kept. Null in the replay of a "
        "retry with the same Idempotency-Key (no second key was made): if the first "
        "response was lost, revoke that key and create another."
    )


class ApiKeyListOut(Schema):
    """Newest first, revoked and expired keys too."""

    items: list[ApiKeyOut]
