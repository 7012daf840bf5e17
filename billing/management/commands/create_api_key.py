from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from agentsite.errors import ApplicationError
from billing.models import ApiKey
from billing.services import account_for_user, api_key_create


class Command(BaseCommand):
    help = (
        "Create an API key acting as <username>, on their account, and print it. It is "
        "shown this once: only its hash is stored."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="command line", help="A label for the key.")
        parser.add_argument(
            "--scopes",
            default=",".join(ApiKey.Scope.values),
            help=f"Comma-separated, of: {', '.join(ApiKey.Scope.values)} (default: all).",
        )
        parser.add_argument(
            "--expires-days", type=int, default=None, help="Expire after N days (default never)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user = get_user_model().objects.get_by_natural_key(options["username"])
        except get_user_model().DoesNotExist as error:
            raise CommandError(f"No user {options['username']!r}.") from error
        days = options["expires_days"]
        if days is not None and days <= 0:
            raise CommandError("--expires-days must be 1 or more.")
        try:
            api_key, raw_key = api_key_create(
                account=account_for_user(user_id=user.pk),
                created_by=user,
                name=options["name"],
                scopes=options["scopes"].split(","),
                expires_at=timezone.now() + timedelta(days=days) if days else None,
            )
        except ApplicationError as error:
            raise CommandError(error.message) from error
        self.stderr.write(
            f"API key {api_key.prefix}… for {user} on {api_key.account} "
            f"(scopes: {', '.join(api_key.scopes)}). Store it now; it is not shown again:"
        )
        # The key alone on stdout, so scripts can capture it.
        self.stdout.write(raw_key)
