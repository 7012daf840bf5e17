"""The one line of budget a user sees next to the chat, e.g. "Budget left today: $4.9812
of $5.00 · this month: $49.9812 of $50.00 · resets 00:00 UTC". The page and the runner's
final event both use it, so the number reads the same live and after a reload."""

from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal

from agentsite.formatting import format_usd

from .pricing import cost_of, price_for_model
from .selectors import UsageSummary, usage_summary
from .services import account_for_user

# What is left shows four decimals (format_usd rounds a dollar or more to cents), so a
# sub-cent answer visibly moves it; rounded down, never up, so it does not show more
# than there is. Below a cent, format_usd's significant digits.
_LEFT_QUANTUM = Decimal("0.0001")
_CENT = Decimal("0.01")


@dataclass(frozen=True)
class BudgetDisplay:
    """`exhausted`: not even the smallest answer fits in what a limit leaves, so the next
    message will be refused (see billing.budget)."""

    text: str
    exhausted: bool


def budget_display(
    *, summary: UsageSummary, smallest_call_usd: Decimal | None, smallest_call_tokens: int
) -> BudgetDisplay | None:
    """What is left of the account's daily, monthly and token limits; None without any.

    `smallest_call_usd` and `smallest_call_tokens` are a lower bound of what one model
    call reserves (its maximum output alone); None when its price is unknown, in which
    case no money limit can call the budget exhausted (an unpriced call reserves none).
    """
    day, month, tokens = summary.day, summary.month, summary.tokens_today
    today: list[str] = []
    blocked_daily = blocked_monthly = False
    if day.limit_usd is not None and day.remaining_usd is not None:
        today.append(f"{_left(day.remaining_usd)} of {format_usd(day.limit_usd)}")
        blocked_daily = _short(day.remaining_usd, smallest_call_usd)
    if tokens.limit is not None and tokens.remaining is not None:
        today.append(f"{tokens.remaining:,} of {tokens.limit:,} tokens")
        blocked_daily = blocked_daily or tokens.remaining < smallest_call_tokens
    parts = []
    if today:
        parts.append("today: " + " and ".join(today))
    if month.limit_usd is not None and month.remaining_usd is not None:
        parts.append(f"this month: {_left(month.remaining_usd)} of {format_usd(month.limit_usd)}")
        blocked_monthly = _short(month.remaining_usd, smallest_call_usd)
    if not parts:
        return None
    # When it renews, the one that matters: a spent month does not come back tomorrow.
    resets = "resets on the 1st, 00:00 UTC" if blocked_monthly or not today else "resets 00:00 UTC"
    return BudgetDisplay(
        text="Budget left " + " · ".join([*parts, resets]),
        exhausted=blocked_daily or blocked_monthly,
    )


def budget_display_for_user(
    *, user_id: int, model: str, max_output_tokens: int
) -> BudgetDisplay | None:
    """`budget_display` for the user's account, for answers by `model`. Two queries
    (the account, its counters), and a third for the price when a money limit is set."""
    summary = usage_summary(account=account_for_user(user_id=user_id))
    smallest_call_usd = None
    if summary.day.limit_usd is not None or summary.month.limit_usd is not None:
        price = price_for_model(model=model)
        if price is not None:
            smallest_call_usd = cost_of(
                price=price, input_tokens=0, output_tokens=max_output_tokens
            )
    return budget_display(
        summary=summary,
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
