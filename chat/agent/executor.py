"""Where runs execute: one small interface, so the same run code can move from asyncio
tasks in the web process (the monolith) to queue workers in other processes."""

import asyncio
import contextlib
import contextvars
import logging
from typing import Any, Protocol
from uuid import UUID

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import transaction

from chat.lifecycle import lease_keeper, run_queued_lease

logger = logging.getLogger(__name__)


def run_control_group(run_id: UUID) -> str:
    return f"run-control.{run_id}"


class RunExecutor(Protocol):
    def queued_lease(self) -> dict[str, Any]:
        """The lease fields of a run this executor is about to be given."""

    def submit(self, run_id: UUID) -> None:
        """Start executing a queued run once the caller's transaction commits (the one
        that created or recovered it); returns at once."""

    def cancel(self, run_id: UUID) -> bool:
        """Stop a run wherever it executes; False if no executor is known to have it."""


class InProcessExecutor:
    """Runs execute as asyncio tasks on the event loop that serves the requests, detached
    from the socket or request that started them: closing the tab does not stop a run.

    `submit` and `cancel` are called from sync code (a service's on_commit, inside a
    worker thread of the ASGI server); async_to_sync hops back to the serving loop.
    With several instances (a Redis channel layer) a cancel is broadcast, because the
    run may execute in another instance than the one whose socket asked to stop it.
    """

    def __init__(self) -> None:
        self._tasks: dict[UUID, asyncio.Task[None]] = {}
        # Cancelled once already: a second cancel (another tab, a delete) must not
        # interrupt the run while it records its outcome and sends its final event.
        self._cancelled: set[UUID] = set()

    def queued_lease(self) -> dict[str, Any]:
        return run_queued_lease()

    def submit(self, run_id: UUID) -> None:
        transaction.on_commit(lambda: async_to_sync(self._start)(run_id))

    def cancel(self, run_id: UUID) -> bool:
        return async_to_sync(self._cancel)(run_id)

    @staticmethod
    def _single_instance() -> bool:
        return isinstance(get_channel_layer(), InMemoryChannelLayer)

    async def _start(self, run_id: UUID) -> None:
        # A fresh context: the caller's belongs to the async_to_sync call that is about to
        # return, and asgiref would route the run's database calls to its dead thread.
        task = asyncio.create_task(
            self._execute(run_id), name=f"run-{run_id}", context=contextvars.Context()
        )
        self._tasks[run_id] = task
        task.add_done_callback(lambda _: self._forget(run_id))
        # The run was created under this process's lease (it is queued until the task
        # runs): renewed from now on, and the task stopped if another process closes it.
        keeper = lease_keeper()
        keeper.hold(run_id, on_lost=task.cancel)
        keeper.ensure_started(self)

    async def _execute(self, run_id: UUID) -> None:
        from .runner import execute_run  # the runner needs the services, which need us

        if self._single_instance():
            await execute_run(run_id)
            return
        layer = get_channel_layer()
        assert layer is not None
        channel = await layer.new_channel()
        listener = asyncio.create_task(self._listen_for_cancel(run_id, channel))
        try:
            await execute_run(run_id)
        finally:
            await _stop_listening(listener, channel)

    async def _listen_for_cancel(self, run_id: UUID, channel: str) -> None:
        """Cancels broadcast by any instance, until the run ends ("run.done"). The run
        never waits for this: when Redis is down or restarts (forgetting the group), the
        run goes on and this subscribes again."""
        layer = get_channel_layer()
        assert layer is not None
        group = run_control_group(run_id)
        try:
            while True:
                try:
                    await layer.group_add(group, channel)
                    while True:
                        message = await layer.receive(channel)
                        if message.get("type") == "run.cancel":
                            await self._cancel_local(run_id)
                            return
                        if message.get("type") == "run.done":
                            return
                except Exception as error:
                    logger.warning("run %s: cancel listener lost Redis: %r", run_id, error)
                    await asyncio.sleep(1)
        finally:
            with contextlib.suppress(Exception):
                await layer.group_discard(group, channel)

    async def _cancel(self, run_id: UUID) -> bool:
        if await self._cancel_local(run_id):
            return True
        if self._single_instance():
            return False
        layer = get_channel_layer()
        assert layer is not None
        await layer.group_send(run_control_group(run_id), {"type": "run.cancel"})
        # Another instance may hold it; a run nobody holds is closed when its lease lapses.
        return True

    async def _cancel_local(self, run_id: UUID) -> bool:
        task = self._tasks.get(run_id)
        if task is None or task.done():
            return False
        if run_id not in self._cancelled:
            self._cancelled.add(run_id)
            task.cancel()
        return True

    def _forget(self, run_id: UUID) -> None:
        lease_keeper().release(run_id)
        self._tasks.pop(run_id, None)
        self._cancelled.discard(run_id)

    async def join(self, run_id: UUID) -> None:
        """Wait for a run to end (used by the tests)."""
        task = self._tasks.get(run_id)
        if task is not None:
            await asyncio.wait([task])

    def active_run_ids(self) -> list[UUID]:
        return list(self._tasks)


async def _stop_listening(listener: asyncio.Task[None], channel: str) -> None:
    """End a cancel listener by a message, not by cancelling it: channels-redis receives
    for all of a process's channels in whichever receive() holds its lock, and a receive
    cancelled while its pop is in flight loses the message it popped, which may be
    another socket's (it was, one run in a few hundred: the final event, published just
    before the run's listener stopped). Cancelled only if the message cannot be sent."""
    layer = get_channel_layer()
    assert layer is not None
    if not listener.done():
        try:
            await layer.send(channel, {"type": "run.done"})
            await asyncio.wait_for(asyncio.shield(listener), timeout=5)
        except Exception:  # Redis is down, say: then no message is in flight to lose
            pass
        finally:
            if not listener.done():
                listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener


_executor = InProcessExecutor()


def get_executor() -> InProcessExecutor:
    return _executor
