from typing import Any

from django.core.management.base import BaseCommand

from agentsite.idempotency.services import idempotency_prune


class Command(BaseCommand):
    help = (
        "Delete Idempotency-Keys older than 24 hours (keys are also pruned per account as "
        "they are used); run it daily from cron."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(f"Deleted {idempotency_prune()} expired idempotency keys.")
