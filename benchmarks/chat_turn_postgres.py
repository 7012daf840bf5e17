"""What does the bounded connection pool do to a chat turn on PostgreSQL?

    .venv/bin/python benchmarks/chat_turn_postgres.py [--turns N]

One fresh database `agentsite_bench_<random>` on 127.0.0.1:5432 (user postgres, trust
auth), dropped at the end. Two child processes of this script, one after the other, each
configured from the environment like a deployment: one with the settings as they are
(Django's psycopg pool, DATABASE_POOL_SIZE), one with the pool option removed (a
connection per thread, closed at the end of each database hop, as before the pool).
Each runs the same chat turns one at a time through the real executor (the offline
model, no token delay, tracing and budget on), each the first turn of a new
conversation: the time from `run_create` to the run's end.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"
WARMUP = 10


def child(turns: int, pooled: bool) -> dict:
    os.environ["DJANGO_SETTINGS_MODULE"] = "agentsite.settings"
    sys.path.insert(0, str(ROOT))
    from agentsite import settings as project_settings

    if not pooled:
        project_settings.DATABASES["default"]["OPTIONS"].pop("pool")
    import django

    django.setup()
    from channels.db import database_sync_to_async
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from billing.services import account_for_user
    from chat import services
    from chat.agent.host import run_host

    call_command("migrate", verbosity=0)
    user = get_user_model().objects.create_user(f"bench-{uuid.uuid4().hex[:6]}")
    account = account_for_user(user_id=user.pk)
    account.plan = None
    account.save()
    connection.close()

    async def turn() -> float:
        conversation = await database_sync_to_async(services.conversation_create)(owner=user)
        started = time.perf_counter()
        run = await database_sync_to_async(services.run_create)(
            conversation=conversation, content="What is 17 * 23?"
        )
        await run_host().join(run.id)
        return time.perf_counter() - started

    async def main() -> list[float]:
        for _ in range(WARMUP):
            await turn()
        return [await turn() for _ in range(turns)]

    times = asyncio.run(main())
    return {
        "pooled": pooled,
        "turns": turns,
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "mean_ms": round(statistics.fmean(times) * 1000, 2),
        "p90_ms": round(statistics.quantiles(times, n=10)[-1] * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--child", choices=["pooled", "unpooled"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.turns, args.child == "pooled")))
        return
    import psycopg

    name = f"agentsite_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    env = {
        **os.environ,
        "AGENTSITE_READ_DOTENV": "false",
        "DEBUG": "false",
        "SECRET_KEY": "chat-turn-benchmark-" + uuid.uuid4().hex + uuid.uuid4().hex,
        "ALLOWED_HOSTS": "localhost",
        "LOG_LEVEL": "WARNING",
        "DATABASE_URL": f"{POSTGRES_SERVER}/{name}",
        "AGENT_OFFLINE_TOKEN_DELAY": "0",
    }
    env.pop("AGENT_REDIS_URL", None)
    try:
        for mode in ("pooled", "unpooled"):
            done = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--turns", str(args.turns)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
                timeout=1800,
                check=True,
            )
            print(done.stdout.strip().splitlines()[-1])
    finally:
        with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
