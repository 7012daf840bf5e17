"""How money and counts read on every page (chat, billing, traces, the admin), so no two
pages disagree about what a run cost."""

from decimal import Decimal


def format_usd(amount: Decimal | float | None) -> str:
    # None means "not priced", which is not the same as free.
    if amount is None:
        return "—"
    amount = Decimal(amount)
    if amount == 0:
        return "$0"
    if amount >= 1:
        return f"${amount:,.2f}"
    if amount >= Decimal("0.01"):
        return f"${amount:.4f}"
    # Sub-cent amounts (a single LLM call) keep their significant digits.
    return "$" + f"{amount:.8f}".rstrip("0")


def format_count(number: int | None) -> str:
    return "—" if number is None else f"{number:,}"
