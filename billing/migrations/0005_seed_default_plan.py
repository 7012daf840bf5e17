"""A default plan for new accounts, so a fresh install is not unlimited: a runaway loop
stops at a few dollars a day. Operators change or replace it in the admin."""

from decimal import Decimal

from django.db import migrations

DEFAULT_PLAN = {
    "name": "Default",
    "is_default": True,
    "money_per_day_usd": Decimal("5"),
    "money_per_month_usd": Decimal("50"),
    "money_per_run_usd": Decimal("1"),
    "concurrent_runs": 4,
}


def seed(apps, schema_editor):
    Plan = apps.get_model("billing", "Plan")
    Account = apps.get_model("billing", "Account")
    plan, _ = Plan.objects.get_or_create(name=DEFAULT_PLAN["name"], defaults=DEFAULT_PLAN)
    Account.objects.filter(plan__isnull=True).update(plan=plan)


class Migration(migrations.Migration):
    dependencies = [("billing", "0004_plans_quotas_reservations")]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
