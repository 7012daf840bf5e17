"""Prices and the arithmetic of cost. Reads only; the ledger is written by services."""

from decimal import ROUND_HALF_UP, Decimal
from fnmatch import fnmatchcase

from agentsite.cache import cache_versioned_get

from .cache import BILLING_CACHE
from .models import ModelPrice

COST_QUANTUM = Decimal("0.00000001")  # 8 decimals, as stored
_MILLION = Decimal(1_000_000)
_WILDCARDS = frozenset("*?[]")


_PRICE_FIELDS = ("model", "input_per_mtok", "output_per_mtok", "cached_input_per_mtok")


def price_for_model(*, model: str) -> ModelPrice | None:
    """The active price for `model`: an exact match, else the most specific matching
    glob (most literal characters; ties broken by the pattern, for a stable answer).
    Asked after every LLM call and for every budget line: read from the cached table of
    active prices (dropped when an operator edits one), not the database."""
    prices = cache_versioned_get(group=BILLING_CACHE, key="prices", read=_active_prices)
    row = prices.get(model)
    if row is None:
        matching = [
            pattern
            for pattern in prices
            if _WILDCARDS.intersection(pattern) and fnmatchcase(model, pattern)
        ]
        if not matching:
            return None
        row = prices[min(matching, key=lambda pattern: (-_literal_chars(pattern), pattern))]
    return ModelPrice(**dict(zip(_PRICE_FIELDS, row, strict=True)))


def _active_prices() -> dict[str, tuple]:
    # Plain values, not model instances: smaller to store and to unpickle on every read.
    rows = ModelPrice.objects.filter(active=True).values_list(*_PRICE_FIELDS)
    return {row[0]: row for row in rows}


def _literal_chars(pattern: str) -> int:
    return sum(1 for char in pattern if char not in _WILDCARDS)


def cost_of(
    *, price: ModelPrice, input_tokens: int, output_tokens: int, cached_tokens: int = 0
) -> Decimal:
    """USD for one call. Providers count cached tokens inside input_tokens: those are
    billed at the cached rate (the input rate when the model has none), the rest of the
    input at the input rate."""
    cached = min(cached_tokens, input_tokens)
    cached_rate = (
        price.cached_input_per_mtok
        if price.cached_input_per_mtok is not None
        else price.input_per_mtok
    )
    micro_usd = (
        (input_tokens - cached) * price.input_per_mtok
        + cached * cached_rate
        + output_tokens * price.output_per_mtok
    )
    return (micro_usd / _MILLION).quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)
