"""Seed the price table with list prices (USD per million tokens) of common models.

These are the providers' public list prices as known when this was written; they change.
Operators must keep them current in the admin (Billing → Model prices): this migration
only gives a fresh install real-looking numbers, and never overwrites an edited row.
Anthropic's cache writes (1.25x input) are billed at the input rate: a slight undercount.
"""

from decimal import Decimal

from django.db import migrations

# model: (input, cached input, output)
LIST_PRICES = {
    "gpt-4.1": ("2.00", "0.50", "8.00"),
    "gpt-4.1-mini": ("0.40", "0.10", "1.60"),
    "gpt-4.1-nano": ("0.10", "0.025", "0.40"),
    "gpt-4o": ("2.50", "1.25", "10.00"),
    "gpt-4o-mini": ("0.15", "0.075", "0.60"),
    "gpt-5": ("1.25", "0.125", "10.00"),
    "gpt-5-mini": ("0.25", "0.025", "2.00"),
    "gpt-5-nano": ("0.05", "0.005", "0.40"),
    "o3": ("2.00", "0.50", "8.00"),
    "o3-mini": ("1.10", "0.55", "4.40"),
    "o4-mini": ("1.10", "0.275", "4.40"),
    "claude-sonnet-4-5": ("3.00", "0.30", "15.00"),
    "claude-sonnet-4-0": ("3.00", "0.30", "15.00"),
    "claude-opus-4-1": ("15.00", "1.50", "75.00"),
    "claude-haiku-4-5": ("1.00", "0.10", "5.00"),
}
# Each name is priced exactly and, through "<name>-2*", its dated snapshots
# ("gpt-4.1-mini-2025-04-14", "claude-sonnet-4-5-20250929"), but never a sibling with a
# price of its own ("o3-pro", "gpt-5-pro", "claude-opus-4-5"): those stay unpriced, and
# flagged, until an operator adds them.
PRICES = {
    pattern: rates
    for name, rates in LIST_PRICES.items()
    for pattern in (name, f"{name}-2*")
}
# The built-in offline model costs nothing to run; priced like gpt-4.1-mini so demo runs
# show what a comparable real model would have cost.
PRICES["agentsite-offline-demo"] = LIST_PRICES["gpt-4.1-mini"]


def seed(apps, schema_editor):
    ModelPrice = apps.get_model("billing", "ModelPrice")
    for model, (input_rate, cached_rate, output_rate) in PRICES.items():
        ModelPrice.objects.get_or_create(
            model=model,
            defaults={
                "input_per_mtok": Decimal(input_rate),
                "cached_input_per_mtok": Decimal(cached_rate),
                "output_per_mtok": Decimal(output_rate),
            },
        )


def unseed(apps, schema_editor):
    apps.get_model("billing", "ModelPrice").objects.filter(model__in=PRICES).delete()


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
