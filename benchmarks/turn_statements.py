"""Every SQL statement of one chat turn, as the server makes them.

    .venv/bin/python benchmarks/turn_statements.py [--postgres] [--list]

One tool-using turn ("What is 17 * 23?": a calculator call, then the answer) through the
real services and executor (admission, start, the reservations, the finish), the first
of a new conversation, after three turns that warm what a process keeps (the cached
limits and prices, the checkpointer's connections). The database is a fresh one: a
SQLite file in a temporary directory, or with `--postgres` a database of its own on
127.0.0.1:5432 (user postgres), dropped at the end. Prints how many statements Django
made and, on PostgreSQL, the checkpointer (its SQLite saver's statements go through
aiosqlite and are not counted); `--list` prints each, in order.
"""

import argparse
import asyncio
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"
WHITESPACE = re.compile(r"\s+")


def count(list_them: bool) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ["DJANGO_SETTINGS_MODULE"] = "agentsite.settings"
    import django

    django.setup()
    import psycopg
    from channels.db import database_sync_to_async
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.db.backends import utils

    from chat import services
    from chat.agent.host import run_host

    made: list[tuple[str, str]] = []

    def record(owner: type, name: str, origin: str) -> None:
        method = getattr(owner, name)

        def recorded(self: Any, sql: Any, *args: Any, **kwargs: Any) -> Any:
            made.append((origin, str(sql)))
            return method(self, sql, *args, **kwargs)

        setattr(owner, name, recorded)

    # Django's statements pass through its cursor wrapper; the checkpointer's (on
    # PostgreSQL) through psycopg's async cursor, which Django never uses (the
    # coroutine is returned as is, the statement recorded when it is called).
    record(utils.CursorWrapper, "_execute", "django")
    record(utils.CursorWrapper, "_executemany", "django")
    record(psycopg.AsyncCursor, "execute", "checkpointer")
    record(psycopg.AsyncCursor, "executemany", "checkpointer")

    call_command("migrate", verbosity=0)
    user = get_user_model().objects.create_user(f"statements-{uuid.uuid4().hex[:6]}")
    connection.close()

    async def turn() -> None:
        conversation = await database_sync_to_async(services.conversation_create)(owner=user)
        made.clear()
        run = await database_sync_to_async(services.run_create)(
            conversation=conversation, content="What is 17 * 23?"
        )
        await run_host().join(run.id)

    async def turns() -> None:
        for _ in range(4):
            await turn()

    asyncio.run(turns())
    origins = sorted({origin for origin, _ in made})
    print(
        f"{len(made)} statements in one turn: "
        + ", ".join(f"{sum(o == origin for o, _ in made)} {origin}" for origin in origins)
    )
    if list_them:
        for origin, sql in made:
            print(f"{origin:12} {WHITESPACE.sub(' ', sql)[:160]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--list", action="store_true", help="print each statement")
    args = parser.parse_args()
    os.environ.update(
        AGENTSITE_READ_DOTENV="false",
        DEBUG="true",
        LOG_LEVEL="WARNING",
        AGENT_OFFLINE_TOKEN_DELAY="0",
    )
    os.environ.pop("AGENT_REDIS_URL", None)
    if not args.postgres:
        with tempfile.TemporaryDirectory() as directory:
            os.environ["DATABASE_URL"] = f"sqlite:///{directory}/db.sqlite3"
            os.environ["AGENT_CHECKPOINT_SQLITE_PATH"] = f"{directory}/checkpoints.sqlite3"
            count(args.list)
        return
    import psycopg

    name = f"agentsite_statements_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        os.environ["DATABASE_URL"] = f"{POSTGRES_SERVER}/{name}"
        count(args.list)
    finally:
        with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
