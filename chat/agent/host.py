"""The runs one process executes: each an asyncio task on the process's loop, its lease
renewed by the process's lease keeper, stopped by cancels broadcast by any instance.

Both executors host their runs here: the in-process one in the web process that created
them, the queue one in the worker process whose job picked them up. Hand-back (shutdown)
goes through the lease keeper, which stops the tasks it holds.
"""

import asyncio
import contextvars
import logging
import sys
from uuid import UUID

from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer

from chat import lifecycle
from chat.lifecycle import StartedRun, lease_keeper

from .runner import execute_run

logger = logging.getLogger(__name__)


# Seconds a run waits for the process's cancel listener to subscribe before it starts
# anyway (only the first runs of a process, or after Redis came back, ever wait).
SUBSCRIBE_WAIT = 1.0

# Every process that hosts runs listens here, on one channel for all its runs, for the
# cancels any instance broadcasts (each names its run). Cancels are rare; subscribing
# and unsubscribing a channel per run cost every run Redis round trips, one of them
# before it could start.
RUN_CONTROL_GROUP = "run-control"


def single_instance() -> bool:
    """No channel layer shared with other processes: a run can only be here."""
    return isinstance(get_channel_layer(), InMemoryChannelLayer)


class RunHost:
    def __init__(self) -> None:
        self._tasks: dict[UUID, asyncio.Task[None]] = {}
        # Cancelled once already: a second cancel (another tab, a delete) must not
        # interrupt the run while it records its outcome and sends its final event.
        self._cancelled: set[UUID] = set()
        # Runs created started (`lifecycle.run_started_here`) whose task has not run yet.
        self._unentered: set[UUID] = set()
        # Set by `drain`: this process is stopping and must start no more runs.
        self.draining = False
        # The cancel listener, on the loop the runs execute on, and whether it listens.
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def hears_cancels(self) -> bool:
        """Whether a cancel of a run executing here, from any instance, reaches this
        process: there is no other, or its cancel listener listens. (From any thread.)"""
        if single_instance():
            return True
        listener = self._listener
        return (
            listener is not None
            and not listener.done()
            and not listener.get_loop().is_closed()
            and self._subscribed.is_set()
        )

    def start(self, run_id: UUID, started: StartedRun | None = None) -> asyncio.Task[None]:
        """Execute a run as a task on the running loop (call it from the loop): a queued
        one, or one created started here (`started`, see `lifecycle.run_started_here`)."""
        # A fresh context: the caller's may belong to an async_to_sync call that is about
        # to return, and asgiref would route the run's database calls to its dead thread.
        task = asyncio.create_task(
            self._execute(run_id, started), name=f"run-{run_id}", context=contextvars.Context()
        )
        self._tasks[run_id] = task
        if started is not None:
            self._unentered.add(run_id)
        task.add_done_callback(lambda _: self._forget(run_id))
        # Its lease (this process's already) renewed from now on, and the task stopped
        # if another process takes the run over or this one hands it back. The executor
        # has started the keeper.
        lease_keeper().hold(run_id, on_lost=task.cancel)
        return task

    async def _execute(self, run_id: UUID, started: StartedRun | None) -> None:
        if started is not None:
            self._unentered.discard(run_id)
            if run_id in self._cancelled:
                await self._close_stopped_before_entry(run_id)
                return
            # Its creation found this process listening for cancels (`hears_cancels`).
            await execute_run(run_id, started)
            return
        if not single_instance():
            try:
                # Listening before the run starts: a cancel sent once it is no longer
                # queued (which a queued run's cancel looks at) must find it. Not for
                # long, though: with Redis down the run goes on without.
                await asyncio.wait_for(self._listening(), timeout=SUBSCRIBE_WAIT)
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                # Stopped before it started: delivered again inside the run, which
                # records it (or, handed back, leaves it to be resumed).
                current = asyncio.current_task()
                assert current is not None
                current.cancel()
        await execute_run(run_id)

    async def _listening(self) -> None:
        """Start the process's cancel listener on this loop, unless it runs there
        already, and wait until it listens."""
        loop = asyncio.get_running_loop()
        if self._listener is None or self._listener.done() or self._listener.get_loop() is not loop:
            self._subscribed = asyncio.Event()
            self._listener = loop.create_task(
                self._listen_for_cancels(self._subscribed),
                name="run-cancel-listener",
                context=contextvars.Context(),
            )
        await asyncio.shield(self._subscribed.wait())

    async def _listen_for_cancels(self, subscribed: asyncio.Event) -> None:
        """Cancels broadcast by any instance, for the runs hosted here, for as long as
        the process lives: never stopped mid-receive (channels-redis receives for all of
        a process's channels in whichever receive() holds its lock, and one cancelled
        while its pop is in flight loses the message it popped, which may be another
        socket's). When Redis is down or restarts (forgetting the group), it subscribes
        again; runs go on meanwhile."""
        layer = get_channel_layer()
        assert layer is not None
        while True:
            try:
                channel = await layer.new_channel()
                await layer.group_add(RUN_CONTROL_GROUP, channel)
                subscribed.set()
                while True:
                    message = await layer.receive(channel)
                    if message.get("type") == "run.cancel":
                        await self.cancel_local(UUID(message["run"]))
            except Exception as error:
                subscribed.clear()
                logger.warning("run cancel listener lost Redis: %r", error)
                await asyncio.sleep(1)

    async def cancel_local(self, run_id: UUID) -> bool:
        task = self._tasks.get(run_id)
        if task is None or task.done():
            return False
        if run_id not in self._cancelled:
            self._cancelled.add(run_id)
            if run_id in self._unentered:
                # Created started (not queued), its task not run yet: the task closes it
                # as cancelled when it runs (`_execute`); cancelling the task would not.
                return True
            # A run not started yet is closed as cancelled here, with its final event;
            # its task, when it runs, finds it so. Not by cancelling the task: it may
            # not have run at all yet (a stop in the same turn of the loop as its
            # submit), and a task cancelled before it first runs never runs: nothing
            # would record the stop, and the run, left queued, would be resumed.
            try:
                closed = await database_sync_to_async(lifecycle.run_cancel_queued)(run_id=run_id)
            except Exception:  # the database is down, say: stopping it matters more
                logger.exception("run %s: could not close it as cancelled", run_id)
                closed = None
            if closed is not None:
                await lifecycle.run_closed_publish(closed)
            else:
                task.cancel()
        return True

    async def _close_stopped_before_entry(self, run_id: UUID) -> None:
        """A run created started and stopped before its task first ran: closed as
        cancelled, with its final event, as a queued one is (`cancel_local`)."""
        try:
            closed = await database_sync_to_async(lifecycle.run_cancel_unstarted)(run_id=run_id)
        except Exception:  # the database is down, say: lost, as a queued run's would be
            logger.exception("run %s: could not close it as cancelled", run_id)
            return
        if closed is not None:
            await lifecycle.run_closed_publish(closed)

    async def cancel(self, run_id: UUID, *, elsewhere: bool) -> bool:
        """Stop a run: here if this process executes it; else, with `elsewhere` (other
        processes may have it), close it as cancelled if nobody has started it (the
        process that has it listens for cancels only once it started it), or broadcast
        the stop to whichever process executes it. False: nobody here has it, and
        nowhere else was asked."""
        if await self.cancel_local(run_id):
            return True
        if not elsewhere:
            return False
        closed = await database_sync_to_async(lifecycle.run_cancel_queued)(run_id=run_id)
        if closed is not None:
            await lifecycle.run_closed_publish(closed)
            return True
        await self._cancel_broadcast(run_id)
        # Another process may hold it; a run nobody holds is closed when its lease lapses.
        return True

    async def _cancel_broadcast(self, run_id: UUID) -> None:
        """To whichever process executes the run (this one included)."""
        layer = get_channel_layer()
        assert layer is not None
        await layer.group_send(RUN_CONTROL_GROUP, {"type": "run.cancel", "run": str(run_id)})

    def _forget(self, run_id: UUID) -> None:
        lease_keeper().release(run_id)
        self._tasks.pop(run_id, None)
        self._cancelled.discard(run_id)
        self._unentered.discard(run_id)

    async def join(self, run_id: UUID) -> None:
        """Wait for a run to end (the tests use it)."""
        task = self._tasks.get(run_id)
        if task is not None:
            await asyncio.wait([task])

    def active_run_ids(self) -> list[UUID]:
        return list(self._tasks)

    async def drain(self, *, seconds: float) -> None:
        """Let the runs here finish for up to `seconds`, then hand the rest back
        (another process resumes them from their checkpoint) and wait for their tasks to
        stop. For a process that is shutting down and takes no new runs."""
        self.draining = True
        lease_keeper().reaping_stop()
        deadline = asyncio.get_running_loop().time() + seconds
        # Again after each wait: a run may start meanwhile (the in-process executor starts
        # what its server still takes; a queue job checks `draining` instead).
        while self._tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            await asyncio.wait(list(self._tasks.values()), timeout=left)
        # Again until none is left, for the same reason.
        while self._tasks:
            logger.warning("handing back %d runs still under way", len(self._tasks))
            await lease_keeper().hand_back()
            if self._tasks:
                await asyncio.wait(list(self._tasks.values()))


_host = RunHost()


def run_host() -> RunHost:
    """This process's runs, whichever executor gave them."""
    return _host


def run_host_hand_back_with_server() -> None:
    """Under Daphne: when the server shuts down (SIGTERM, a deploy), hand back the runs
    this process executes, before the reactor stops, so another instance resumes them
    from their checkpoint (their clients' streams resume there) instead of finding them
    interrupted a lease later. Daphne serves on Twisted's asyncio reactor, which waits
    for the Deferred a "before shutdown" trigger returns. Under another server (or none:
    the tests) nothing is registered."""
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None or type(reactor).__name__ != "AsyncioSelectorReactor":
        return
    from twisted.internet.defer import Deferred

    def hand_back() -> Deferred[None]:
        return Deferred.fromFuture(asyncio.ensure_future(_host.drain(seconds=0)))

    reactor.addSystemEventTrigger("before", "shutdown", hand_back)  # type: ignore[attr-defined]
