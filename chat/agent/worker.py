"""One `manage.py agent_worker` process: a Procrastinate worker executing runs' jobs
(AGENT_EXECUTOR=queue), up to AGENT_WORKER_CONCURRENCY at once on one event loop, with
this process's lease keeper renewing their leases and reaping runs whose process died.

Shutdown (SIGTERM or SIGINT): no new jobs are taken; the runs under way have
AGENT_WORKER_DRAIN_SECONDS to finish; the rest are handed back (their leases made to
lapse, their tasks stopped without finishing them), so that any process's reaper resumes
them from their checkpoint; then the process exits 0.
"""

import asyncio
import contextlib
import logging
import signal

from procrastinate.contrib.django import app, connector_params
from procrastinate.psycopg_connector import PsycopgConnector

from chat.lifecycle import PROCESS_ID, lease_keeper

from .executor import get_executor
from .host import run_host

logger = logging.getLogger(__name__)

# Procrastinate's own queries (fetch a job, finish it, heartbeats) are short: a few
# connections serve many runs. LISTEN/NOTIFY holds one more, outside this pool.
JOB_POOL_SIZE = 4


async def worker_serve(*, concurrency: int, drain_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # The worker needs an async connector that can LISTEN (a job is picked up within
    # milliseconds of its transaction's commit, not at the next poll): psycopg's, on a
    # connection of its own to the same database. Runs still defer their jobs through
    # the Django connector (see `queue._jobs`).
    connector = PsycopgConnector(kwargs=connector_params(), min_size=1, max_size=JOB_POOL_SIZE)
    with app.replace_connector(connector):
        async with app.open_async():
            # Renewing and reaping from the start: a worker that restarts after a crash
            # recovers the runs it (or any process) left, without waiting for a job.
            # The runs it recovers go back to the queue (any worker may pick them up).
            lease_keeper().ensure_started(get_executor())
            worker = asyncio.create_task(
                app.run_worker_async(
                    name=PROCESS_ID,
                    concurrency=concurrency,
                    # Ours: SIGTERM hands runs back rather than aborting their jobs (so
                    # no shutdown_graceful_timeout either: it waits for them).
                    install_signal_handlers=False,
                ),
                name="procrastinate-worker",
            )
            stop = asyncio.create_task(stopping.wait())
            await asyncio.wait([worker, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if worker.done():
                # Procrastinate stopped by itself (its database went away, say): nothing
                # takes jobs any more, and whatever runs here goes back at once.
                await run_host().drain(seconds=0)
            else:
                logger.info(
                    "worker stopping: no new runs; %d under way may finish within %g s",
                    len(run_host().active_run_ids()),
                    drain_seconds,
                )
                # Procrastinate stops fetching and waits for its jobs, which end as their
                # runs end (finished or handed back).
                worker.cancel()
                await run_host().drain(seconds=drain_seconds)
            with contextlib.suppress(asyncio.CancelledError):
                await worker  # raises what made it stop by itself
    logger.info("worker stopped")
