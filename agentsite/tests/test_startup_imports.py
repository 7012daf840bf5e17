"""A server loads only the libraries its configuration uses.

Each of these takes megabytes of memory in every process that imports it (measured with
benchmarks/turn_cost.py, idle RSS): a server on the embedded defaults (the offline model,
SQLite, no Redis, no OTLP endpoint) never calls them, and used to hold them all, about
80 MiB of its 200. Checked in a fresh interpreter that starts the app as Daphne does and
answers one chat turn.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

NOT_ON_THE_DEFAULT_PATH = [
    "anthropic",  # ~40 MiB
    "openai",  # ~13 MiB
    "langchain_openai",
    "langchain_anthropic",
    "psycopg",  # ~9 MiB, with its pool and LangGraph's Postgres saver ~12
    "psycopg_pool",
    "langgraph.checkpoint.postgres",
    "redis",  # ~7 MiB
    "opentelemetry.exporter.otlp.proto.http",  # ~3 MiB with protobuf
]

# Starts the app like `python -m agentsite.serve agentsite.asgi:application`, then runs
# one turn through the real executor (a tool call and a streamed answer).
SCRIPT = """
import json, sys
import django
django.setup()
import agentsite.asgi
import asyncio
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.core.management import call_command
from chat import services
from chat.agent.host import run_host

call_command("migrate", verbosity=0)
user = get_user_model().objects.create_user("imports")
conversation = services.conversation_create(owner=user)

async def turn():
    run = await database_sync_to_async(services.run_create)(
        conversation=conversation, content="What is 17 * 23?"
    )
    await run_host().join(run.id)
    return run

run = asyncio.run(turn())
run.refresh_from_db()
loaded = [name for name in sys.argv[1:] if name in sys.modules]
print(json.dumps({"status": run.status, "loaded": loaded}))
"""


def _last_line_of(script: str, *args: str, **settings: str) -> str:
    """Run `script` in a fresh interpreter whose environment sets nothing of ours but
    `settings`; the last line it printed."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AGENT_", "DATABASE_", "DJANGO_", "OTEL_"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE="agentsite.settings",
        AGENTSITE_READ_DOTENV="false",
        DEBUG="true",
        **settings,
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_offline_server_on_sqlite_loads_no_provider_sdk_postgres_redis_or_exporter(
    tmp_path: Path,
) -> None:
    last = _last_line_of(
        SCRIPT,
        *NOT_ON_THE_DEFAULT_PATH,
        AGENT_MODEL="offline",
        AGENT_OFFLINE_TOKEN_DELAY="0",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        AGENT_CHECKPOINT_SQLITE_PATH=str(tmp_path / "checkpoints.sqlite3"),
    )
    assert json.loads(last) == {"status": "completed", "loaded": []}


def test_a_server_on_one_provider_loads_its_sdk_at_startup_and_not_the_others() -> None:
    script = (
        "import sys, django\n"
        "django.setup()\n"
        "import agentsite.asgi\n"
        "print([name for name in ('openai', 'anthropic') if name in sys.modules])\n"
    )
    last = _last_line_of(script, AGENT_MODEL="openai", AGENT_OPENAI_API_KEY="sk-test")
    # Loaded before the first run (an import takes seconds of the event loop), alone.
    assert last == "['openai']"
