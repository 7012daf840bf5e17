"""Procrastinate's tasks (it imports `<app>.tasks` of every installed app; installed only
on PostgreSQL, see settings): the run job of AGENT_EXECUTOR=queue and the upkeep of the
jobs table, which every `agent_worker` runs (each periodic job is deferred once per
tick, whichever worker gets there first)."""

from uuid import UUID

from channels.db import database_sync_to_async
from procrastinate import builtin_tasks, job_context, jobs
from procrastinate.contrib.django import app

from .agent import queue

run_execute = app.task(name=queue.TASK_NAME, queue=queue.QUEUE)(queue.run_job)

# A job is only how a run reaches a worker: the run keeps the record. A day of finished
# jobs is enough to look into the queue's recent past.
JOB_RETENTION_HOURS = 24
UPKEEP_QUEUE = "upkeep"


@app.periodic(cron="17 * * * *", periodic_id="jobs_prune")
@app.task(queue=UPKEEP_QUEUE, queueing_lock="jobs_prune", pass_context=True)
async def jobs_prune(context: job_context.JobContext, timestamp: int) -> None:
    """Procrastinate never deletes jobs by itself: hourly, every finished one older than
    JOB_RETENTION_HOURS, whatever its ending."""
    await builtin_tasks.remove_old_jobs(
        context,
        max_hours=JOB_RETENTION_HOURS,
        remove_failed=True,
        remove_cancelled=True,
        remove_aborted=True,
    )


@app.periodic(cron="* * * * *", periodic_id="jobs_stalled_fail")
@app.task(queue=UPKEEP_QUEUE, queueing_lock="jobs_stalled_fail", pass_context=True)
async def jobs_stalled_fail(context: job_context.JobContext, timestamp: int) -> None:
    """A worker killed mid-run leaves its jobs `doing` forever (Procrastinate does not
    retry stalled jobs by itself). Their runs are not lost: their leases lapse, and a
    reaper resumes them through new jobs (or closes them). So the old jobs are only
    marked failed, once their worker's heartbeat is stale, never retried; but a run
    whose worker died before it took its lease has none to lapse, and is given one."""
    manager = context.app.job_manager
    for job in await manager.get_stalled_jobs(task_name=queue.TASK_NAME):
        await manager.finish_job(job=job, status=jobs.Status.FAILED, delete_job=False)
        run_id = UUID(str(job.task_kwargs["run_id"]))  # as `queue.run_job_defer` wrote it
        await database_sync_to_async(queue.run_pickup_lapse)(run_id=run_id)
