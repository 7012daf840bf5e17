"""The embedded monolith under many runs at once: every run writes its checkpoints, its
budget and its trace into SQLite files, and none may fail on `database is locked`."""

import asyncio
import os
from collections import Counter

import pytest
from channels.db import database_sync_to_async

from chat import services
from chat.models import Run
from conftest import account_with_limits, wait_for_runs

pytestmark = pytest.mark.django_db(transaction=True)

RUNS = 100


async def test_a_hundred_concurrent_runs_all_complete_on_sqlite(make_user, settings, busy_core):
    # Paced tokens keep every run alive at once, so they all write side by side.
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.01
    assert settings.DATABASES["default"]["ENGINE"].endswith("sqlite3")
    assert os.path.isabs(settings.AGENT_CHECKPOINT_SQLITE_PATH)  # a real file
    user = await database_sync_to_async(make_user)()
    await database_sync_to_async(account_with_limits)(user)  # no limit in the way

    def start() -> None:
        conversation = services.conversation_create(owner=user)
        services.run_create(conversation=conversation, content="What is 17 * 23?")

    await asyncio.gather(*(database_sync_to_async(start)() for _ in range(RUNS)))
    await asyncio.wait_for(wait_for_runs(), timeout=240)

    outcomes = Counter(
        [(run.status, run.error_code, run.error_message) async for run in Run.objects.all()]
    )
    assert outcomes == {(Run.Status.COMPLETED, "", ""): RUNS}
