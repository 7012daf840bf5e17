"""Make sure a newcomer can log in right after `make run`."""

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create an 'admin' superuser with a random password (printed once) if none exists."

    def handle(self, *args: Any, **options: Any) -> None:
        users = get_user_model()
        existing = users.objects.filter(is_superuser=True).first()
        if existing is not None:
            self.stdout.write(
                f"Log in as the existing superuser '{existing.get_username()}' "
                "(forgot the password? python manage.py changepassword "
                f"{existing.get_username()})."
            )
            return
        password = secrets.token_urlsafe(12)
        users.objects.create_superuser(username="admin", email="", password=password)
        banner = "=" * 64
        self.stdout.write(
            f"{banner}\nCreated a local login. Shown once, keep it:\n"
            f"  username: admin\n  password: {password}\n{banner}"
        )
