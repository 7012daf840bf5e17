"""Prices and the arithmetic of cost. Reads only; the ledger is written by services."""

from decimal import ROUND_HALF_UP, Decimal
from fnmatch import fnmatchcase

from .models import ModelPrice

COST_QUANTUM = Decimal("0.00000001")  # 8 decimals, as stored
_MILLION = Decimal(1_000_000)
_WILDCARDS = frozenset("*?[]")


def price_for_model(*, model: str) -> ModelPrice | None:
    """The active price for `model`: an exact match, else the most specific matching
    glob (most literal characters; ties broken by the pattern, for a stable answer)."""
    # Asked before every LLM call: the exact name alone first, one row, no table scan
    # into model instances.
    exact = ModelPrice.objects.filter(active=True, model=model).first()
    if exact is not None:
        return exact
    prices = list(ModelPrice.objects.filter(active=True))
    matching = [
        p for p in prices if _WILDCARDS.intersection(p.model) and fnmatchcase(model, p.model)
    ]
    if not matching:
        return None
    return min(matching, key=lambda p: (-_literal_chars(p.model), p.model))


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
