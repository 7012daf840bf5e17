"""A burst of API requests on PostgreSQL: each server process borrows from a bounded pool
(DATABASE_POOL_SIZE), so it never holds more connections than that and never answers
500 "too many clients". A real server (the one `make run` starts) on its own database."""

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, _free_port, _runserver, _server_env, _wait_until_up
from tests.servers import POSTGRES, postgres_available, postgres_database

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not postgres_available(),
        reason="PostgreSQL is NOT reachable on 127.0.0.1:5432: the connection bound is untested",
    ),
]

POOL_SIZE = 4
REQUESTS = 100
ROUNDS = 3

PREPARE = """
from django.contrib.auth import get_user_model
from django.core.management import call_command
from billing.services import account_for_user, api_key_create
call_command("migrate", interactive=False, verbosity=0)
user = get_user_model().objects.create_user("burst")
account = account_for_user(user_id=user.pk)
account.plan = None  # no request limit in the way of the burst
account.save()
print(api_key_create(account=account, created_by=user, name="burst", scopes=["usage"])[1])
"""


@dataclass(frozen=True)
class PostgresServer:
    url: str
    api_key: str
    database: str
    log: Path


@pytest.fixture
def postgres_server(tmp_path: Path) -> Iterator[PostgresServer]:
    with postgres_database("agentsite_conns") as database_url:
        env = _server_env(tmp_path)
        env.update(
            DATABASE_URL=database_url,
            DATABASE_POOL_SIZE=str(POOL_SIZE),
            AGENT_RATE_LIMIT_PER_MINUTE="0",
            LOG_LEVEL="WARNING",
        )
        port = _free_port()
        log = tmp_path / "server.log"
        server: subprocess.Popen[bytes] | None = None
        try:
            prepared = subprocess.run(
                [sys.executable, "manage.py", "shell", "--no-imports", "-c", PREPARE],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert prepared.returncode == 0, prepared.stderr[-3000:]
            server = _runserver(env, port, log)
            url = f"http://127.0.0.1:{port}"
            _wait_until_up(url, server, log)
            api_key = prepared.stdout.strip().splitlines()[-1]
            yield PostgresServer(url, api_key, database_url.rsplit("/", 1)[1], log)
        finally:
            if server is not None:
                server.kill()
                server.wait()


class ConnectionWatcher(threading.Thread):
    """Counts the server's connections to its database every few milliseconds."""

    def __init__(self, database: str) -> None:
        super().__init__(daemon=True)
        self.database = database
        self.most = 0
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(POSTGRES, autocommit=True) as watcher:
            while not self.done.is_set():
                row = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                    (self.database,),
                ).fetchone()
                self.most = max(self.most, row[0] if row else 0)
                self.samples += 1
                time.sleep(0.005)


async def burst(server: PostgresServer) -> list[int]:
    limits = httpx.Limits(max_connections=REQUESTS)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:
        responses = await asyncio.gather(
            *(
                client.get("/api/v1/usage", headers={"X-API-Key": server.api_key})
                for _ in range(REQUESTS)
            )
        )
    return [response.status_code for response in responses]


def test_a_burst_of_requests_stays_within_the_pool(postgres_server: PostgresServer) -> None:
    watcher = ConnectionWatcher(postgres_server.database)
    watcher.start()
    try:
        statuses = [status for _ in range(ROUNDS) for status in asyncio.run(burst(postgres_server))]
    finally:
        watcher.done.set()
        watcher.join()

    errors = [s for s in statuses if s != 200]
    assert errors == [], (
        f"{len(errors)} failed: {sorted(set(errors))}\n" + (postgres_server.log.read_text()[-3000:])
    )
    assert watcher.samples > 0
    # The requests borrowed and returned pooled connections; the pool never grew past
    # its bound, however many requests were waiting.
    assert watcher.most <= POOL_SIZE, f"{watcher.most} connections at once"
