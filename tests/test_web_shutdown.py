"""AGENT_EXECUTOR=inline with two web instances (the one `make run` serves, twice) on one
PostgreSQL database and one Redis: SIGTERM on the instance executing a run (a deploy)
hands the run back as the server shuts down, and the other instance resumes it; the
browser, reconnected there, gets the rest of the answer."""

import asyncio
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.drills import (
    DrillServer,
    Login,
    RedisServer,
    needs_postgres_and_redis_server,
    receive,
    receive_until,
)
from tests.servers import postgres_database

pytestmark = [
    *needs_postgres_and_redis_server("the web shutdown is untested"),
]


@dataclass
class TwoInstances:
    first: DrillServer
    second: DrillServer
    login: Login
    database_url: str


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[TwoInstances]:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        with postgres_database("agentsite_webstop") as database_url:
            env = {
                "DATABASE_URL": database_url,
                "AGENT_REDIS_URL": redis.url,
                "AGENT_EXECUTOR": "inline",
                "AGENT_OFFLINE_TOKEN_DELAY": "0.1",  # about 6 s for the answer
                "AGENT_RUN_LEASE_SECONDS": "3",
            }
            (tmp_path / "first").mkdir()
            (tmp_path / "second").mkdir()
            first = DrillServer(tmp_path / "first", **env)
            second = DrillServer(tmp_path / "second", **env)
            try:
                login = first.prepare_and_start()
                second.start()
                yield TwoInstances(first, second, login, database_url)
            finally:
                first.stop()
                second.stop()
    finally:
        redis.kill()


async def test_sigterm_hands_the_runs_of_a_web_instance_to_another(
    instances: TwoInstances,
) -> None:
    first, second = instances.first, instances.second
    async with first.socket(instances.login) as socket:
        assert (await receive(socket))["type"] == "session"
        await socket.send(json.dumps({"type": "message", "content": "Tell me about yourself"}))
        seen = await receive_until(socket, "token")
        run, last_seq = seen[-1]["run"], seen[-1]["seq"]
        assert first.process is not None
        first_pid = first.process.pid
        first.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(first.process.wait, 30)
    first.process = None
    # Given back as the server stopped: its lease lapsed then, not a lease after the
    # last renewal (or the other instance has it already).
    with psycopg.connect(instances.database_url) as db:
        [(owner, handed_back)] = db.execute(
            "SELECT lease_owner, lease_expires_at <= now() FROM chat_run WHERE id = %s", (run,)
        ).fetchall()
    assert handed_back or int(owner.split(":")[1]) != first_pid

    async with second.socket(instances.login) as socket:
        assert (await receive(socket))["type"] == "session"
        await socket.send(json.dumps({"type": "resume", "run": run, "after_seq": last_seq}))
        frames = await receive_until(socket, "run.completed", wait=60)

    # Resumed, not interrupted (a killed instance's runs are only found a lease later).
    assert "run.resumed" in [frame["type"] for frame in frames]
    assert frames[-1]["run"] == run and frames[-1]["messages"][-1]["content"]
    with psycopg.connect(instances.database_url) as db:
        [(status, recoveries)] = db.execute(
            "SELECT status, recoveries FROM chat_run WHERE id = %s", (run,)
        ).fetchall()
    assert (status, recoveries) == ("completed", 1)
