"""The SQL statements one run's finish makes (`finisher.run_end_record`), on whatever
database DATABASE_URL names: test_finisher.py runs it on SQLite and PostgreSQL, each in
a fresh database, as a deployment would run (its own process, the real executor).

    DATABASE_URL=… python -m chat.tests.finish_statements

One turn ("What is 17 * 23?": a calculator call, then the answer) of a user whose
account has the default plan's limits, and one of a user whose account has none, each
after a first turn that warms what a process keeps (the cached limits and prices).
Prints one JSON object: each turn's finish statements, in order."""

import asyncio
import json
import os
from typing import Any


def setup() -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "agentsite.settings"
    import django

    django.setup()


def capture_finishes(into: list[list[str]]) -> None:
    """Record the statements of every finish from now on, one list per finish."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from chat.agent import finisher

    record = finisher.run_end_record

    def recorded(**kwargs: Any) -> Any:
        # On the database thread, whose connection this is.
        with CaptureQueriesContext(connection) as queries:
            ended = record(**kwargs)
        into.append([query["sql"] for query in queries.captured_queries])
        return ended

    finisher.run_end_record = recorded


async def turn(user: Any) -> None:
    from channels.db import database_sync_to_async

    from chat import services
    from chat.agent.host import run_host
    from chat.models import Run

    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(services.run_create)(
        conversation=conversation, content="What is 17 * 23?"
    )
    await run_host().join(run.id)
    await run.arefresh_from_db()
    assert run.status == Run.Status.COMPLETED, (run.status, run.error_message)


def main() -> None:
    setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from billing.services import account_for_user

    call_command("migrate", interactive=False, verbosity=0)
    limited = get_user_model().objects.create_user("limited")
    account_for_user(user_id=limited.pk)  # the default plan's limits
    unlimited = get_user_model().objects.create_user("unlimited")
    account = account_for_user(user_id=unlimited.pk)
    account.plan = None
    account.save()
    connection.close()

    finishes: list[list[str]] = []
    capture_finishes(finishes)

    async def turns() -> dict[str, list[str]]:
        measured = {}
        for name, user in (("limits", limited), ("no_limits", unlimited)):
            await turn(user)  # warms the process's caches
            finishes.clear()
            await turn(user)
            (measured[name],) = finishes
        return measured

    print(json.dumps(asyncio.run(turns())))


if __name__ == "__main__":
    main()
