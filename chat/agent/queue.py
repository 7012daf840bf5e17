"""AGENT_EXECUTOR=queue: runs are Procrastinate jobs in PostgreSQL, executed by
`manage.py agent_worker` processes, each hosting many runs at once on its event loop.

Enqueueing. A run's job is inserted through Procrastinate's Django connector, on the
Django connection (and so in the transaction) that creates or recovers the run: both
commit, or neither does. The run is created without a lease: the queue holds it, and the
worker that picks the job takes the lease first (`run_lease_take`), then starts it.

One job per run, and no Procrastinate `lock`: the app already refuses a second active run
in a conversation (`run_create`'s `run_active`), so runs of one conversation cannot
overtake each other; and a lock held by a `doing` job whose worker was killed would
block that conversation's next job (its recovered run's included) until someone
noticed. Jobs are not retried by Procrastinate either: a run records its own failure,
and a run whose worker died is found by its lapsed lease and resumed from its
checkpoint through a new job (the lease keeper's reaper calls `submit`).

Cancel. A running run is stopped through the Redis run-control broadcast its worker's
host listens to, as between web instances. A run still queued is closed as cancelled
here, its row locked so that a worker starting it meanwhile waits and then finds it no
longer queued; its job, when picked, ends at once.
"""

import asyncio
import logging
import time
from typing import Any
from uuid import UUID

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.db import transaction
from django.db.models import Exists
from django.utils import timezone
from procrastinate.contrib.django.django_connector import DjangoConnector
from procrastinate.contrib.django.models import ProcrastinateJob
from procrastinate.manager import JobManager
from procrastinate.tasks import configure_task

from agentsite.logging import run_id_var
from chat import lifecycle
from chat.lifecycle import StartedRun
from chat.metrics import run_pickup_observe
from chat.models import Run

from .host import RunHost, run_host

logger = logging.getLogger(__name__)

QUEUE = "runs"
TASK_NAME = "agentsite.run_execute"

# Always Django's connection of the calling thread, whatever connector the worker's app
# uses for itself: so a job deferred by the reaper in a worker process joins the
# reaper's transaction too.
_jobs = JobManager(DjangoConnector())


# A run the queue holds: nobody's lease (`Run.lease_owner` is blank, never null).
QUEUE_LEASE: dict[str, Any] = {"lease_owner": "", "lease_expires_at": None}


def run_job_defer(*, run_id: UUID) -> int:
    """Insert the run's job in the current transaction; its id."""
    deferrer = configure_task(name=TASK_NAME, job_manager=_jobs, queue=QUEUE)
    return deferrer.defer(run_id=str(run_id), enqueued_at=time.time())


class QueueExecutor:
    def __init__(self, host: RunHost) -> None:
        self.host = host

    def queued_lease(self) -> dict[str, Any]:
        return dict(QUEUE_LEASE)

    def new_run(self) -> dict[str, Any]:
        # Queued: a worker starts it (`run_start`), whichever takes its job.
        return self.queued_lease()

    def submit(self, run_id: UUID, started: StartedRun | None = None) -> None:
        assert started is None, "runs are created queued for the queue"
        run_job_defer(run_id=run_id)

    def cancel(self, run_id: UUID) -> bool:
        return async_to_sync(self._cancel)(run_id)

    async def _cancel(self, run_id: UUID) -> bool:
        return await self.host.cancel(run_id, elsewhere=True)


def run_lease_take(*, run_id: UUID) -> bool:
    """Take the lease of a run the queue holds (nobody's), as the in-process executor
    holds its runs' from their creation: from here on this process renews it, or hands
    it back, and a reaper recovers it if this process dies, even before it starts.
    False: the run is no longer the queue's (cancelled, deleted, taken)."""
    taken = Run.objects.filter(
        id=run_id, status=Run.Status.QUEUED, lease_expires_at__isnull=True
    ).update(**lifecycle.run_queued_lease())
    return bool(taken)


def run_pickup_lapse(*, run_id: UUID) -> bool:
    """For a job whose worker died before it took its run's lease (`run_lease_take`),
    marked failed already: if the run is still the queue's and no other job of it is to
    come (one a recovery deferred since), nothing will start it, and a null lease never
    lapses. Made to lapse now, so a reaper resumes it through a new job. False: the
    worker had taken the lease (a reaper finds it as it lapses), another job has it, or
    it is over."""
    # `_default_manager`: its read-only `objects`, which django-stubs cannot type.
    coming = ProcrastinateJob._default_manager.filter(
        task_name=TASK_NAME, status__in=("todo", "doing"), args__run_id=str(run_id)
    )
    lapsed = (
        Run.objects.filter(id=run_id, status=Run.Status.QUEUED, lease_expires_at__isnull=True)
        .exclude(Exists(coming))
        .update(lease_expires_at=timezone.now())
    )
    return bool(lapsed)


async def run_job(*, run_id: str, enqueued_at: float) -> None:
    """The job of one run, in a worker: host it and wait for it to end (or to be handed
    back). Shielded: whatever happens to the job (Procrastinate aborts its task on some
    paths), the run's fate is its host's and its lease's."""
    run_id_var.set(run_id)
    waited = max(time.time() - enqueued_at, 0.0)
    run_pickup_observe(seconds=waited)
    logger.info("run %s picked up %.1f ms after it was queued", run_id, waited * 1000)
    if not await database_sync_to_async(run_lease_take)(run_id=UUID(run_id)):
        logger.info("run %s is no longer queued: its job ends", run_id)
        return
    host = run_host()
    if host.draining:
        # Picked as this worker stops: its drain is under way or over, and would wait
        # for the whole run (the worker exits once its jobs end). Another worker's.
        await database_sync_to_async(run_requeue)(run_id=UUID(run_id))
        logger.info("run %s picked as this worker stops: queued again", run_id)
        return
    await asyncio.shield(host.start(UUID(run_id)))


def run_requeue(*, run_id: UUID) -> None:
    """Give a run whose lease this process took (`run_lease_take`) and that it did not
    start back to the queue: its lease emptied and a new job, together."""
    with transaction.atomic():
        mine = Run.objects.filter(
            id=run_id, status=Run.Status.QUEUED, lease_owner=lifecycle.PROCESS_ID
        )
        if mine.update(**QUEUE_LEASE):
            run_job_defer(run_id=run_id)
