"""Where runs execute: one small interface, so the same run code can move from asyncio
tasks in the web process (the monolith) to queue workers in other processes."""

import asyncio
import contextvars
import logging
from typing import Protocol
from uuid import UUID

from asgiref.sync import async_to_sync

logger = logging.getLogger(__name__)


class RunExecutor(Protocol):
    def submit(self, run_id: UUID) -> None:
        """Start executing a queued run; returns at once."""

    def cancel(self, run_id: UUID) -> bool:
        """Stop a run this executor is executing; False if it is not executing it."""


class InProcessExecutor:
    """Runs execute as asyncio tasks on the event loop that serves the requests, detached
    from the socket or request that started them: closing the tab does not stop a run.

    `submit` and `cancel` are called from sync code (a service's on_commit, inside a
    worker thread of the ASGI server); async_to_sync hops back to the serving loop.
    """

    def __init__(self) -> None:
        self._tasks: dict[UUID, asyncio.Task[None]] = {}

    def submit(self, run_id: UUID) -> None:
        async_to_sync(self._start)(run_id)

    def cancel(self, run_id: UUID) -> bool:
        return async_to_sync(self._cancel)(run_id)

    async def _start(self, run_id: UUID) -> None:
        from .runner import execute_run  # the runner needs the services, which need us

        # A fresh context: the caller's belongs to the async_to_sync call that is about to
        # return, and asgiref would route the run's database calls to its dead thread.
        task = asyncio.create_task(
            execute_run(run_id), name=f"run-{run_id}", context=contextvars.Context()
        )
        self._tasks[run_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(run_id, None))

    async def _cancel(self, run_id: UUID) -> bool:
        task = self._tasks.get(run_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    async def join(self, run_id: UUID) -> None:
        """Wait for a run to end (tests and graceful shutdown)."""
        task = self._tasks.get(run_id)
        if task is not None:
            await asyncio.wait([task])

    def active_run_ids(self) -> list[UUID]:
        return list(self._tasks)


_executor = InProcessExecutor()


def get_executor() -> InProcessExecutor:
    return _executor
