"""The runs endpoints behind a real Daphne server (the one `make run` starts), as
integrations get them: Server-Sent Events that a client drops and resumes with
Last-Event-ID, and one Idempotency-Key sent by concurrent requests on PostgreSQL."""

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, _server_env, serving
from tests.servers import postgres_available, postgres_database

# A user whose account has no limits, a key with the `runs` scope, and conversations
# (the conversations endpoints are another branch's): the key, then one id a line.
PREPARE = """
from django.contrib.auth import get_user_model
from django.core.management import call_command
from billing.services import account_for_user, api_key_create
from chat.services import conversation_create
call_command("migrate", interactive=False, verbosity=0)
user = get_user_model().objects.create_user("integration")
account = account_for_user(user_id=user.pk)
account.plan = None
account.save()
print(api_key_create(account=account, created_by=user, name="it", scopes=["runs"])[1])
for _ in range(8):
    print(conversation_create(owner=user).id)
"""
LONG = "tell me a long story " * 5
FINAL = ("run.completed", "run.failed", "run.cancelled", "run.interrupted")


@dataclass
class Server:
    url: str
    key: str
    conversations: list[str]
    log: Path
    database_url: str

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"X-API-Key": self.key}, timeout=60, trust_env=False
        )


def start_server(workdir: Path, database_url: str) -> Iterator[Server]:
    env = {
        **_server_env(workdir),
        "DATABASE_URL": database_url,
        "AGENT_RATE_LIMIT_PER_MINUTE": "0",
    }
    prepared = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", PREPARE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    key, *conversations = prepared.stdout.strip().splitlines()[-9:]
    log = workdir / "server.log"
    with serving(env, log) as url:
        yield Server(url, key, conversations, log, database_url)


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("runs-api")
    yield from start_server(workdir, f"sqlite:///{workdir / 'db.sqlite3'}")


class SSEReader:
    """Reads the events of one SSE response, one at a time, checking each `id:` and
    `event:` line against the event it carries."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()

    async def next(self) -> dict:
        fields: dict[str, str] = {}
        async for line in self.lines:
            if line == "":
                if "data" in fields:
                    event = json.loads(fields["data"])
                    assert fields["id"] == str(event["seq"]), fields
                    assert fields["event"] == event["type"], fields
                    return event
                fields = {}  # a heartbeat comment's end
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        raise EOFError("the stream ended")

    async def rest(self) -> list[dict]:
        events = []
        while True:
            try:
                events.append(await self.next())
            except EOFError:
                return events


@asynccontextmanager
async def sse(
    client: httpx.AsyncClient, method: str, path: str, **kwargs: object
) -> AsyncIterator[SSEReader]:
    async with client.stream(method, path, **kwargs) as response:  # type: ignore[arg-type]
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SSEReader(response)


def contiguous(events: list[dict], first: int = 1) -> bool:
    return [e["seq"] for e in events] == list(range(first, first + len(events)))


async def test_a_stream_dropped_mid_run_resumes_with_last_event_id(sqlite_server: Server) -> None:
    conversation = sqlite_server.conversations[0]
    async with sqlite_server.client() as client:
        async with sse(
            client,
            "POST",
            f"/api/v1/conversations/{conversation}/runs",
            json={"message": LONG, "mode": "stream"},
        ) as stream:
            seen = [await stream.next() for _ in range(5)]
            run = stream.response.headers["x-agentsite-run"]
        # The connection is gone; the run is not.
        assert seen[-1]["type"] not in FINAL
        async with sse(
            client, "GET", f"/api/v1/runs/{run}/events", headers={"Last-Event-ID": "5"}
        ) as resumed:
            rest = await resumed.rest()
        events = seen + rest
        assert contiguous(events), [e["seq"] for e in events]
        assert events[-1]["type"] == "run.completed"
        assert {e["run"] for e in events} == {run}
        # Exactly what the run's whole log holds, once each.
        async with sse(client, "GET", f"/api/v1/runs/{run}/events") as everything:
            assert await everything.rest() == events


async def test_a_drop_between_the_replay_and_the_live_part_loses_nothing(
    sqlite_server: Server,
) -> None:
    conversation = sqlite_server.conversations[1]
    async with sqlite_server.client() as client:
        started = await client.post(
            f"/api/v1/conversations/{conversation}/runs",
            json={"message": LONG, "mode": "background"},
        )
        assert started.status_code == 202, started.text
        run = started.json()["id"]
        # An observer follows the whole run: it tells how far the log is at any moment.
        async with sse(client, "GET", f"/api/v1/runs/{run}/events") as observer:
            observed = [await observer.next() for _ in range(3)]
            # The client saw 2 events and dropped; meanwhile the run went on (to seq 3+).
            async with sse(
                client, "GET", f"/api/v1/runs/{run}/events", headers={"Last-Event-ID": "2"}
            ) as resumed:
                # Everything up to what the log held when it reconnected is replayed...
                replayed = [await resumed.next() for _ in range(len(observed) - 2)]
            # ...and it drops again right there, before any live event.
            last = replayed[-1]["seq"]
            async with sse(
                client,
                "GET",
                f"/api/v1/runs/{run}/events",
                headers={"Last-Event-ID": str(last)},
            ) as live:
                rest = await live.rest()
            observed += await observer.rest()
        client_saw = observed[:2] + replayed + rest
        assert contiguous(client_saw), [e["seq"] for e in client_saw]
        assert client_saw == observed
        assert client_saw[-1]["type"] == "run.completed"


async def test_a_stream_tells_proxies_not_to_buffer_or_cache_it(sqlite_server: Server) -> None:
    conversation = sqlite_server.conversations[2]
    async with (
        sqlite_server.client() as client,
        sse(
            client,
            "POST",
            f"/api/v1/conversations/{conversation}/runs",
            json={"message": "hello", "mode": "stream"},
        ) as stream,
    ):
        assert stream.response.headers["cache-control"] == "no-cache"
        assert stream.response.headers["x-accel-buffering"] == "no"
        events = await stream.rest()
    assert events[0]["type"] == "run.started" and events[-1]["type"] == "run.completed"


# --- One key, concurrent requests, PostgreSQL ----------------------------------------


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not postgres_available():
        pytest.skip("PostgreSQL is NOT reachable on 127.0.0.1:5432: concurrent keys untested")
    with postgres_database("agentsite_idem") as database_url:
        yield from start_server(tmp_path_factory.mktemp("runs-api-pg"), database_url)


def count(server: Server, sql: str, *params: object) -> int:
    with psycopg.connect(server.database_url) as connection:
        row = connection.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.postgres
async def test_concurrent_requests_with_one_key_start_one_run(postgres_server: Server) -> None:
    conversation = postgres_server.conversations[0]
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"message": "hello", "mode": "background"}
    async with postgres_server.client() as client:
        responses = await asyncio.gather(
            *(
                client.post(f"/api/v1/conversations/{conversation}/runs", json=body, headers=key)
                for _ in range(8)
            )
        )
    assert [r.status_code for r in responses] == [202] * 8, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert (
        sorted(r.headers.get("idempotent-replayed", "") for r in responses) == [""] + ["true"] * 7
    )
    # The first response, every time (as JSON: PostgreSQL's jsonb keeps no key order).
    assert all(r.json() == responses[0].json() for r in responses)
    assert (
        count(
            postgres_server,
            "SELECT count(*) FROM chat_run WHERE conversation_id = %s",
            conversation,
        )
        == 1
    )


@pytest.mark.postgres
async def test_concurrent_waits_with_one_key_run_once_and_the_others_are_told(
    postgres_server: Server,
) -> None:
    conversation = postgres_server.conversations[1]
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"message": LONG, "mode": "wait"}
    path = f"/api/v1/conversations/{conversation}/runs"
    async with postgres_server.client() as client:
        responses = await asyncio.gather(
            *(client.post(path, json=body, headers=key) for _ in range(4))
        )
        statuses = sorted(r.status_code for r in responses)
        # One answers when its run is over; the others came while it was answering.
        assert statuses == [200, 409, 409, 409], [r.text for r in responses]
        answered = next(r for r in responses if r.status_code == 200)
        busy = [r.json()["error"] for r in responses if r.status_code == 409]
        assert {e["code"] for e in busy} == {"idempotency_in_flight"}
        assert {e["details"]["run"] for e in busy} == {answered.json()["id"]}
        replay = await client.post(path, json=body, headers=key)
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == answered.json()
    run = answered.json()["id"]
    assert (
        count(
            postgres_server,
            "SELECT count(*) FROM chat_run WHERE conversation_id = %s",
            conversation,
        )
        == 1
    )
    ledger = "SELECT count(*) FROM billing_usagerecord WHERE run_id = %s"
    calls = count(postgres_server, ledger, run)
    assert calls > 0
    async with postgres_server.client() as client:
        again = await client.post(path, json=body, headers=key)
    assert again.status_code == 200 and count(postgres_server, ledger, run) == calls
