from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from tracing.services import trace_prune


class Command(BaseCommand):
    help = "Delete traces (and their spans) older than N days (default TRACING_RETENTION_DAYS)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=int,
            default=None,
            help=f"Keep this many days of traces (default {settings.TRACING_RETENTION_DAYS}).",
        )

    def handle(self, *args: Any, days: int | None = None, **options: Any) -> None:
        days = settings.TRACING_RETENTION_DAYS if days is None else days
        if days < 0:
            self.stderr.write("--days must be 0 or more.")
            raise SystemExit(2)
        deleted = trace_prune(older_than_days=days)
        self.stdout.write(f"Deleted {deleted} trace(s) older than {days} day(s).")
