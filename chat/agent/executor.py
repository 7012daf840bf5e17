"""Where runs execute (AGENT_EXECUTOR): one small interface, so the same run code runs as
asyncio tasks in the web process (`inline`, the monolith) or in queue worker processes
(`queue`, see `chat.agent.queue`). Either way the run is hosted by a process's `RunHost`.

The services call `new_run` (or, recovering a run, `queued_lease`) and `submit` inside
the transaction that creates (or recovers) a run, and `cancel` after theirs commits.
"""

from functools import cache
from typing import Any, Protocol
from uuid import UUID

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import transaction

from chat import lifecycle
from chat.lifecycle import StartedRun

from .host import RunHost, run_host, single_instance


class RunExecutor(Protocol):
    def queued_lease(self) -> dict[str, Any]:
        """The lease fields of a queued run this executor is being given."""

    def new_run(self) -> dict[str, Any]:
        """The status and lease fields of a run being created for this executor: queued
        (with `queued_lease`), or started already (`lifecycle.run_started_here`)."""

    def submit(self, run_id: UUID, started: StartedRun | None = None) -> None:
        """Have the run executed once the current transaction commits (call it inside);
        `started`: it was created started, and this is what starting it reads."""

    def cancel(self, run_id: UUID) -> bool:
        """Stop a run wherever it executes; False if no executor is known to have it."""


class InProcessExecutor:
    """Runs execute as asyncio tasks on the event loop that serves the requests, detached
    from the socket or request that started them: closing the tab does not stop a run.

    `submit` and `cancel` are called from sync code (a service, inside a worker thread of
    the ASGI server); async_to_sync hops back to the serving loop. With several
    instances (a Redis channel layer) a cancel is broadcast, because the run may execute
    in another instance than the one whose socket asked to stop it.
    """

    def __init__(self, host: RunHost) -> None:
        self.host = host

    def queued_lease(self) -> dict[str, Any]:
        # Taken now: this process starts the run within milliseconds, and renews it until.
        return lifecycle.run_queued_lease()

    def new_run(self) -> dict[str, Any]:
        # Started now, and executed here at once, with what its creation read: no hop
        # to start it. Not if a stop sent to another instance might not reach this one
        # (its cancel listener does not listen yet): queued, the run can be stopped
        # before it starts wherever the stop lands (`RunHost.cancel`).
        if self.host.hears_cancels():
            return lifecycle.run_started_here()
        return self.queued_lease()

    def submit(self, run_id: UUID, started: StartedRun | None = None) -> None:
        transaction.on_commit(lambda: async_to_sync(self._start)(run_id, started))

    async def _start(self, run_id: UUID, started: StartedRun | None) -> None:
        self.host.start(run_id, started)
        # Where the runs it recovers go: here.
        lifecycle.lease_keeper().ensure_started(self)

    def cancel(self, run_id: UUID) -> bool:
        return async_to_sync(self._cancel)(run_id)

    async def _cancel(self, run_id: UUID) -> bool:
        return await self.host.cancel(run_id, elsewhere=not single_instance())


@cache
def get_executor() -> RunExecutor:
    if settings.AGENT_EXECUTOR == "queue":
        # Imported only here: the monolith never loads Procrastinate (nor psycopg).
        from .queue import QueueExecutor

        return QueueExecutor(run_host())
    return InProcessExecutor(run_host())
