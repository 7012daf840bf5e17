from decimal import Decimal

import pytest

from billing.cache import billing_cache_invalidate
from billing.models import ModelPrice
from billing.pricing import cost_of, price_for_model

pytestmark = pytest.mark.django_db


def price(model="m", input_rate="2.00", output_rate="8.00", cached_rate="0.50"):
    created = ModelPrice.objects.create(
        model=model,
        input_per_mtok=Decimal(input_rate),
        output_per_mtok=Decimal(output_rate),
        cached_input_per_mtok=None if cached_rate is None else Decimal(cached_rate),
    )
    billing_cache_invalidate()  # as the admin does: prices are cached
    return created


def test_cached_input_is_billed_at_the_cached_rate_the_rest_at_the_input_rate():
    p = price()
    # 1000 input of which 400 cached, 500 output:
    # 600 * 2.00 + 400 * 0.50 + 500 * 8.00 = 1200 + 200 + 4000 = 5400 micro-USD.
    assert cost_of(price=p, input_tokens=1000, output_tokens=500, cached_tokens=400) == Decimal(
        "0.00540000"
    )


def test_without_a_cached_rate_cached_tokens_cost_the_input_rate():
    p = price(cached_rate=None)
    assert cost_of(price=p, input_tokens=1000, output_tokens=0, cached_tokens=400) == Decimal(
        "0.002"
    )


def test_cost_is_rounded_to_eight_decimals():
    p = price(input_rate="0.025", output_rate="0", cached_rate=None)
    # 1 token at $0.025/M = $0.000000025 -> 0.00000003 (half up).
    assert cost_of(price=p, input_tokens=1, output_tokens=0) == Decimal("0.00000003")
    assert cost_of(price=p, input_tokens=0, output_tokens=0) == Decimal(0)


def test_the_most_specific_pattern_wins_and_an_exact_name_beats_every_pattern(prices):
    assert price_for_model(model="gpt-4.1-mini-2025-04-14").model == "gpt-4.1-mini-2*"
    assert price_for_model(model="gpt-4.1-2025-04-14").model == "gpt-4.1-2*"
    assert price_for_model(model="o3-mini").model == "o3-mini"
    assert price_for_model(model="claude-sonnet-4-5-20250929").model == "claude-sonnet-4-5-2*"
    price(model="gpt-4.1*", input_rate="1")
    price(model="gpt-4.1-mini-2025*", input_rate="2")
    assert price_for_model(model="gpt-4.1-mini-2025-04-14").model == "gpt-4.1-mini-2025*"
    assert price_for_model(model="gpt-4.1-turbo").model == "gpt-4.1*"
    price(model="gpt-4.1-mini*", input_rate="9")
    assert price_for_model(model="gpt-4.1-mini").model == "gpt-4.1-mini"  # exact wins


def test_an_unknown_or_inactive_model_has_no_price(prices):
    assert price_for_model(model="llama-3-70b") is None
    # A sibling with a price of its own is not priced like its family.
    for sibling in ("o3-pro", "gpt-5-pro", "claude-opus-4-5"):
        assert price_for_model(model=sibling) is None
    ModelPrice.objects.filter(model="agentsite-offline-demo").update(active=False)
    billing_cache_invalidate()
    assert price_for_model(model="agentsite-offline-demo") is None


def test_the_seed_prices_the_default_models(prices):
    from django.conf import settings

    for model in (
        settings.AGENT_OPENAI_MODEL,
        settings.AGENT_ANTHROPIC_MODEL,
        "gpt-4o",
        "gpt-4o-mini",
        "o4-mini",
        "claude-opus-4-1",
        "claude-haiku-4-5",
        "agentsite-offline-demo",
    ):
        assert price_for_model(model=model) is not None, model
