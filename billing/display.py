"""The one line of budget a user sees next to the chat, e.g. "Budget left today: $4.9812
of $5.00 · this month: $49.9812 of $50.00 · resets 00:00 UTC". The page and the chat
socket (from a run's final event) both word it here, so it reads the same live and
after a reload."""

from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Any

from agentsite.formatting import format_usd

from .pricing import cost_of, price_for_model
from .quotas import account_limits
from .selectors import UsageSummary, usage_summary_of
from .services import account_for_user

# What is left shows four decimals (format_usd rounds a dollar or more to cents), so a
# sub-cent answer visibly moves it; rounded down, never up, so it does not show more
# than there is. Below a cent, format_usd's significant digits.
_LEFT_QUANTUM = Decimal("0.0001")
_CENT = Decimal("0.01")


@dataclass(frozen=True)
class BudgetLeft:
    """What is left of an account's limits, as (remaining, limit) pairs, None where it
    has no such limit; `exhausted_*`: not even the smallest answer fits in what that
    period's limits leave, so the next message will be refused (see billing.budget).
    Plain values: a run's final event carries them (`as_data`), the page words them
    (`budget_display`)."""

    day_usd: tuple[Decimal, Decimal] | None
    month_usd: tuple[Decimal, Decimal] | None
    tokens_today: tuple[int, int] | None
    exhausted_today: bool
    exhausted_month: bool

    def as_data(self) -> dict[str, Any]:
        """JSON-ready; amounts as decimal strings (exact, unlike JSON numbers)."""
        return {
            "day_usd": _money_data(self.day_usd),
            "month_usd": _money_data(self.month_usd),
            "tokens_today": list(self.tokens_today) if self.tokens_today else None,
            "exhausted_today": self.exhausted_today,
            "exhausted_month": self.exhausted_month,
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "BudgetLeft":
        tokens = data["tokens_today"]
        return cls(
            day_usd=_money_from_data(data["day_usd"]),
            month_usd=_money_from_data(data["month_usd"]),
            tokens_today=(tokens[0], tokens[1]) if tokens else None,
            exhausted_today=data["exhausted_today"],
            exhausted_month=data["exhausted_month"],
        )


def _money_data(pair: tuple[Decimal, Decimal] | None) -> list[str] | None:
    return [format(amount, "f") for amount in pair] if pair else None


def _money_from_data(pair: list[str] | None) -> tuple[Decimal, Decimal] | None:
    return (Decimal(pair[0]), Decimal(pair[1])) if pair else None


@dataclass(frozen=True)
class BudgetDisplay:
    """`exhausted`: the next message will be refused (see `BudgetLeft`)."""

    text: str
    exhausted: bool


def budget_left(
    *, summary: UsageSummary, smallest_call_usd: Decimal | None, smallest_call_tokens: int
) -> BudgetLeft | None:
    """What is left of the account's daily, monthly and token limits; None without any.

    `smallest_call_usd` and `smallest_call_tokens` are a lower bound of what one model
    call reserves (its maximum output alone); None when its price is unknown, in which
    case no money limit can call the budget exhausted (an unpriced call reserves none).
    """
    day, month, tokens = summary.day, summary.month, summary.tokens_today
    day_usd = month_usd = None
    tokens_today = None
    exhausted_today = exhausted_month = False
    if day.limit_usd is not None and day.remaining_usd is not None:
        day_usd = (day.remaining_usd, day.limit_usd)
        exhausted_today = _short(day.remaining_usd, smallest_call_usd)
    if tokens.limit is not None and tokens.remaining is not None:
        tokens_today = (tokens.remaining, tokens.limit)
        exhausted_today = exhausted_today or tokens.remaining < smallest_call_tokens
    if month.limit_usd is not None and month.remaining_usd is not None:
        month_usd = (month.remaining_usd, month.limit_usd)
        exhausted_month = _short(month.remaining_usd, smallest_call_usd)
    if day_usd is None and month_usd is None and tokens_today is None:
        return None
    return BudgetLeft(
        day_usd=day_usd,
        month_usd=month_usd,
        tokens_today=tokens_today,
        exhausted_today=exhausted_today,
        exhausted_month=exhausted_month,
    )


def budget_display(left: BudgetLeft) -> BudgetDisplay:
    """The line the chat page shows for what is left."""
    today: list[str] = []
    if left.day_usd is not None:
        remaining, limit = left.day_usd
        today.append(f"{_left(remaining)} of {format_usd(limit)}")
    if left.tokens_today is not None:
        remaining_tokens, limit_tokens = left.tokens_today
        today.append(f"{remaining_tokens:,} of {limit_tokens:,} tokens")
    parts = []
    if today:
        parts.append("today: " + " and ".join(today))
    if left.month_usd is not None:
        remaining, limit = left.month_usd
        parts.append(f"this month: {_left(remaining)} of {format_usd(limit)}")
    # When it renews, the one that matters: a spent month does not come back tomorrow.
    resets = (
        "resets on the 1st, 00:00 UTC" if left.exhausted_month or not today else "resets 00:00 UTC"
    )
    return BudgetDisplay(
        text="Budget left " + " · ".join([*parts, resets]),
        exhausted=left.exhausted_today or left.exhausted_month,
    )


def budget_left_for_user(*, user_id: int, model: str, max_output_tokens: int) -> BudgetLeft | None:
    """`budget_left` for the user's account, for answers by `model`: one query for the
    account and its limits, read afresh (not from the cache: the line must agree with a
    refusal, which reads them under the account's lock, even right after an edit made by
    another process than this one), and one for its counters unless it has no limits.
    The price comes from the cache."""
    account = account_for_user(user_id=user_id)
    limits = account_limits(account=account)
    money_limited = limits.money_per_day_usd is not None or limits.money_per_month_usd is not None
    if not money_limited and limits.tokens_per_day is None:
        return None
    smallest_call_usd = None
    if money_limited:
        price = price_for_model(model=model)
        if price is not None:
            smallest_call_usd = cost_of(
                price=price, input_tokens=0, output_tokens=max_output_tokens
            )
    return budget_left(
        summary=usage_summary_of(account_id=account.pk, limits=limits),
        smallest_call_usd=smallest_call_usd,
        smallest_call_tokens=max_output_tokens,
    )


def _left(amount: Decimal) -> str:
    if amount < _CENT:
        return format_usd(amount)
    return f"${amount.quantize(_LEFT_QUANTUM, rounding=ROUND_DOWN):,}"


def _short(remaining: Decimal, smallest_call_usd: Decimal | None) -> bool:
    if smallest_call_usd is None:
        return False
    return remaining <= 0 or remaining < smallest_call_usd
