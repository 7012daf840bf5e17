"""AGENT_EXECUTOR=queue against real processes: a web server (`runserver`, as `make run`
serves) and two `manage.py agent_worker` processes on a PostgreSQL database of their own
and a redis-server of their own, started once for the module. The browser talks to the
web server; the runs execute in the workers."""

import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import ROOT
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
    *needs_postgres_and_redis_server("the queue executor is untested"),
]

# About 6 s for the offline model's longer answers: long enough to cancel or stop a
# worker mid-answer.
TOKEN_DELAY = "0.1"
QUEUE_ENV = {
    "AGENT_EXECUTOR": "queue",
    "AGENT_OFFLINE_TOKEN_DELAY": TOKEN_DELAY,
    "AGENT_RUN_LEASE_SECONDS": "3",
    "AGENT_WORKER_DRAIN_SECONDS": "1",
}
LONG_ANSWER = "Tell me about yourself"


@dataclass
class QueueSite:
    server: DrillServer
    login: Login
    database_url: str
    workdir: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"worker-{len(self.workers)}.log").open("ab")
        worker = subprocess.Popen(
            [sys.executable, "manage.py", "agent_worker"],
            cwd=ROOT,
            env=self.server.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(worker)
        return worker

    def wait_for_workers(self, count: int) -> None:
        """Until `count` workers are registered with Procrastinate (taking jobs)."""
        deadline = time.monotonic() + 60
        while self.query("SELECT count(*) FROM procrastinate_workers")[0][0] < count:
            for worker in self.workers:
                assert worker.poll() is None, f"a worker exited:\n{self.worker_logs()}"
            assert time.monotonic() < deadline, f"workers did not start:\n{self.worker_logs()}"
            time.sleep(0.1)

    def worker_logs(self) -> str:
        return "".join(log.read_text() for log in sorted(self.workdir.glob("worker-*.log")))

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, autocommit=True) as db:
            return db.execute(sql, params).fetchall()

    def shell(self, script: str) -> Any:
        """Run `script` in a process of the web code (Django set up); its last line of
        output, as JSON."""
        done = subprocess.run(
            [sys.executable, "manage.py", "shell", "--no-imports", "-c", script],
            cwd=ROOT,
            env=self.server.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    async def run_where(self, run: str, *statuses: str) -> tuple[Any, ...]:
        """The run's status, lease owner and expiry once its status is one of these."""
        deadline = time.monotonic() + 60
        while True:
            row = self.query(
                "SELECT status, lease_owner, lease_expires_at FROM chat_run WHERE id = %s", run
            )[0]
            if row[0] in statuses:
                return row
            assert time.monotonic() < deadline, f"run {run} stayed {row[0]}"
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueSite]:
    workdir = tmp_path_factory.mktemp("queue")
    redis = RedisServer(workdir)
    redis.start()
    try:
        with postgres_database("agentsite_queue") as database_url:
            server = DrillServer(
                workdir, DATABASE_URL=database_url, AGENT_REDIS_URL=redis.url, **QUEUE_ENV
            )
            site = QueueSite(
                server=server,
                login=server.prepare_and_start(),
                database_url=database_url,
                workdir=workdir,
            )
            try:
                site.start_worker()
                site.start_worker()
                site.wait_for_workers(2)
                yield site
            finally:
                for worker in site.workers:
                    worker.kill()
                    worker.wait()
                server.stop()
    finally:
        redis.kill()


def pid_of(lease_owner: str) -> int:
    """`lifecycle.PROCESS_ID`: host:pid:random."""
    return int(lease_owner.split(":")[1])


TRANSACTIONS = """
import json
from django.contrib.auth import get_user_model
from django.db import transaction
from chat import services

user = get_user_model().objects.get(username="drill")

class Undone(Exception):
    pass

conversation = services.conversation_create(owner=user)
committed = services.run_create(conversation=conversation, content="What is 2 + 2?")
try:
    with transaction.atomic():
        conversation = services.conversation_create(owner=user)
        rolled_back = services.run_create(conversation=conversation, content="never mind")
        raise Undone
except Undone:
    pass
print(json.dumps({"rolled_back": str(rolled_back.id), "committed": str(committed.id)}))
"""


async def test_a_runs_job_commits_or_rolls_back_with_the_run(site: QueueSite) -> None:
    runs = site.shell(TRANSACTIONS)

    def jobs_of(run: str) -> int:
        return site.query(
            "SELECT count(*) FROM procrastinate_jobs WHERE args->>'run_id' = %s", run
        )[0][0]

    assert jobs_of(runs["rolled_back"]) == 0
    assert site.query("SELECT count(*) FROM chat_run WHERE id = %s", runs["rolled_back"]) == [(0,)]
    assert jobs_of(runs["committed"]) == 1
    # And a worker answered it.
    await site.run_where(runs["committed"], "completed")


async def test_a_cancel_reaches_the_worker_and_stops_the_run(site: QueueSite) -> None:
    async with site.server.socket(site.login) as socket:
        assert (await receive(socket))["type"] == "session"
        await socket.send(json.dumps({"type": "message", "content": LONG_ANSWER}))
        run = (await receive_until(socket, "token"))[-1]["run"]
        await socket.send(json.dumps({"type": "cancel"}))
        # The answer takes seconds more: without the cancel reaching the worker, it
        # would end completed.
        final = await receive_until(socket, "run.cancelled")

    assert final[-1]["run"] == run
    assert not any(frame["type"] == "run.completed" for frame in final)
    assert (await site.run_where(run, "cancelled", "completed"))[0] == "cancelled"


QUEUED_CANCEL = """
import json
from unittest import mock
from django.contrib.auth import get_user_model
from chat import services
from chat.agent.executor import get_executor

user = get_user_model().objects.get(username="drill")
conversation = services.conversation_create(owner=user)
# No job: as if every worker were busy and none had picked it up yet.
with mock.patch.object(get_executor(), "submit"):
    run = services.run_create(conversation=conversation, content="never mind")
services.run_cancel(conversation=conversation, run_id=run.id)
run.refresh_from_db()
print(json.dumps({"status": run.status, "error": run.error_code}))
"""


async def test_a_cancel_closes_a_run_no_worker_has_started(site: QueueSite) -> None:
    # Nobody executes it to hear the broadcast, and a queued run has no lease to lapse:
    # without this it would wait in its conversation for ever.
    assert site.shell(QUEUED_CANCEL) == {"status": "cancelled", "error": "cancelled"}


STALLED_PICKUP = """
import json
import time
from unittest import mock
from django.contrib.auth import get_user_model
from django.db import connection
from procrastinate.exceptions import AlreadyEnqueued
from chat import services
from chat.agent.executor import get_executor
from chat.agent.queue import QUEUE, TASK_NAME
from chat.tasks import jobs_stalled_fail

REPLACED = False  # the test sets it

user = get_user_model().objects.get(username="drill")
conversation = services.conversation_create(owner=user)
with mock.patch.object(get_executor(), "submit"):
    run = services.run_create(conversation=conversation, content="What is 2 + 2?")
args = json.dumps({"run_id": str(run.id), "enqueued_at": time.time()})
with connection.cursor() as cursor:
    # What a worker killed as it picked a run's job leaves: the job `doing`, its
    # heartbeat long stale, and the run still the queue's (no lease taken yet).
    cursor.execute(
        "INSERT INTO procrastinate_workers (last_heartbeat) "
        "VALUES (now() - interval '1 hour') RETURNING id"
    )
    [worker] = cursor.fetchone()
    cursor.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, worker_id) "
        "VALUES (%s, %s, %s::jsonb, 'doing', %s) RETURNING id",
        [QUEUE, TASK_NAME, args, worker],
    )
    [job] = cursor.fetchone()
    if REPLACED:
        # The run has a job of its own still to come (as after a recovery while every
        # worker is busy): in a few seconds, after the upkeep below.
        cursor.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, scheduled_at) "
            "VALUES (%s, %s, %s::jsonb, 'todo', now() + interval '5 seconds')",
            [QUEUE, TASK_NAME, args],
        )
try:  # now rather than at the next minute
    jobs_stalled_fail.defer(timestamp=0)
except AlreadyEnqueued:  # the minute's own is about to run
    pass
print(json.dumps({"job": job, "run": str(run.id)}))
"""


async def test_a_run_whose_worker_died_as_it_picked_its_job_is_answered(site: QueueSite) -> None:
    picked = site.shell(STALLED_PICKUP)
    # Not left waiting for ever (and blocking its conversation): answered by a new job.
    assert (await site.run_where(picked["run"], "completed", "interrupted"))[0] == "completed"
    # And the dead worker's job does not stay `doing`.
    deadline = time.monotonic() + 60
    while site.query("SELECT status FROM procrastinate_jobs WHERE id = %s", picked["job"]) != [
        ("failed",)
    ]:
        assert time.monotonic() < deadline, "the stalled job was left doing"
        await asyncio.sleep(0.1)


async def test_a_run_whose_dead_workers_job_was_replaced_is_not_recovered_again(
    site: QueueSite,
) -> None:
    picked = site.shell(STALLED_PICKUP.replace("REPLACED = False", "REPLACED = True"))
    # Answered by the job it has, without burning one of its recoveries (a run past its
    # limit is given up).
    await site.run_where(picked["run"], "completed", "interrupted")
    recorded = site.query("SELECT status, recoveries FROM chat_run WHERE id = %s", picked["run"])
    assert recorded == [("completed", 0)]


LATE_PICKUP = """
import asyncio
import json
import os
import time
from unittest import mock
from django.contrib.auth import get_user_model
from chat import services
from chat.agent.executor import get_executor
from chat.agent.host import run_host
from chat.agent.queue import run_job

user = get_user_model().objects.get(username="drill")
conversation = services.conversation_create(owner=user)
with mock.patch.object(get_executor(), "submit"):
    run = services.run_create(conversation=conversation, content="What is 2 + 2?")

async def stopping_worker_picks_it():
    # This process is a worker told to stop (its drain began) whose last fetched job
    # only now gets as far as the run.
    await run_host().drain(seconds=0)
    await run_job(run_id=str(run.id), enqueued_at=time.time())

asyncio.run(stopping_worker_picks_it())
run.refresh_from_db()
print(json.dumps({"run": str(run.id), "status": run.status, "pid": os.getpid()}))
"""


async def test_a_run_picked_as_its_worker_stops_is_answered_by_another(site: QueueSite) -> None:
    picked = site.shell(LATE_PICKUP)
    # The stopping worker did not run it (it would have held up its exit for the whole
    # answer): back in the queue, and answered by a worker still taking runs.
    assert picked["status"] == "queued"
    status, owner, _ = await site.run_where(picked["run"], "completed", "interrupted")
    assert status == "completed"
    assert pid_of(owner) in {worker.pid for worker in site.workers}


async def test_pickup_latency_of_fifty_runs(site: QueueSite) -> None:
    """Not a timed assertion: prints the queue's pickup latency (run with -s)."""
    runs = site.shell(
        "import json\n"
        "from django.contrib.auth import get_user_model\n"
        "from chat import services\n"
        "from billing.services import account_for_user\n"
        "user = get_user_model().objects.get(username='drill')\n"
        "account = account_for_user(user_id=user.pk)\n"
        "account.plan = None  # no limit on runs at once\n"
        "account.save()\n"
        "from django.core.cache import cache\n"
        "cache.clear()  # the limits cached before (this test's own Redis)\n"
        "runs = [\n"
        "    services.run_create(\n"
        "        conversation=services.conversation_create(owner=user), content='Hello'\n"
        "    ).id\n"
        "    for _ in range(50)\n"
        "]\n"
        "print(json.dumps([str(run) for run in runs]))\n"
    )
    for run in runs:
        await site.run_where(run, "completed")
    waited = {
        match[1]: float(match[2])
        for match in re.finditer(r"run (\S+) picked up ([\d.]+) ms", site.worker_logs())
    }
    latencies = sorted(waited[run] for run in runs)
    assert len(latencies) == 50
    p99 = latencies[min(len(latencies) - 1, round(0.99 * len(latencies)))]
    print(
        f"\nqueue pickup latency over {len(latencies)} runs (enqueue to start, 2 workers): "
        f"p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, "
        f"max {latencies[-1]:.1f} ms"
    )


async def test_sigterm_hands_a_run_back_and_another_worker_completes_it(
    site: QueueSite,
) -> None:
    async with site.server.socket(site.login) as socket:
        assert (await receive(socket))["type"] == "session"
        await socket.send(json.dumps({"type": "message", "content": LONG_ANSWER}))
        seen = await receive_until(socket, "token")
        run = seen[-1]["run"]
        [(owner,)] = site.query("SELECT lease_owner FROM chat_run WHERE id = %s", run)
        [worker] = [w for w in site.workers if w.pid == pid_of(owner)]
        worker.send_signal(signal.SIGTERM)
        # Its run cannot finish within the drain (1 s): handed back, the worker exits 0.
        assert await asyncio.to_thread(worker.wait, 60) == 0, site.worker_logs()

        frames = await receive_until(socket, "run.completed", wait=60)

    types = [frame["type"] for frame in frames]
    assert "run.resumed" in types
    [(status, owner_after, recoveries)] = site.query(
        "SELECT status, lease_owner, recoveries FROM chat_run WHERE id = %s", run
    )
    assert (status, recoveries) == ("completed", 1)
    assert pid_of(owner_after) != worker.pid
