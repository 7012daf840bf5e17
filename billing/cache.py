"""What billing keeps in the cache (agentsite.cache): what operators edit in the admin
and every turn reads. Users' accounts and their limits (`services.account_quotas_for_user`)
and the model prices (`pricing.price_for_model`) are one group, dropped together."""

from agentsite.cache import cache_versioned_invalidate

BILLING_CACHE = "billing"


def billing_cache_invalidate() -> None:
    """Call after changing an account, plan, membership or price (the admin does): the
    next turn of every process that shares the cache reads the new ones."""
    cache_versioned_invalidate(group=BILLING_CACHE)
