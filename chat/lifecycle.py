"""The run's life, in one place: both executors start, heartbeat and finish runs here, and
every process reaps here the runs whose process died.

The lease. The process executing a run holds its lease: `Run.lease_owner` (the
process's id) and `Run.lease_expires_at`, renewed every AGENT_RUN_LEASE_SECONDS / 3 by
the process's `LeaseKeeper`, in one UPDATE for all the runs it holds. A run whose lease
lapsed has nobody executing it. Every process's keeper looks for such runs on every tick
and claims each with one conditional UPDATE (so exactly one process recovers it,
`run_recover`): the hold of its cut call is settled for what it streamed up to its last
renewal, and it is queued again and handed to the keeper's executor, which resumes it
from its last checkpoint (`chat.agent.runner`) under the same trace, its events
numbered past any seq a client saw. A run recovered AGENT_RUN_MAX_RECOVERIES times
already is closed as `interrupted` instead (`run_close`): its trace closed with the
spans flushed so far, and a final event appended to its log.

A process that stops on purpose (a worker's drain, a web instance's shutdown) hands its
runs back (`LeaseKeeper.hand_back`): their leases lapse at once, and a reaper resumes
them as it would a crashed process's.

A queued run's lease is held by whoever will start it. The in-process executor takes it
at creation (it starts the run within milliseconds, in the same process, and renews it
until then), so a crash in between is reaped like any other; nearly always it creates
the run started already (`run_started_here`), with what `run_start` would read again
(`run_started_at_creation`). A queue executor leaves it empty: the queue holds the run,
which is never lost while it waits, and the worker takes the lease when it starts it.
"""

import asyncio
import contextvars
import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, DateTimeField, F, Min, PositiveIntegerField, Q, Value, When
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from agentsite.text import text_storable
from billing.budget import RunCost, Usage, usage_close_run
from billing.models import ApiKey
from billing.services import account_quotas_for_user
from tracing.capture import trace_status_for
from tracing.export import schedule_stored
from tracing.services import trace_close_interrupted

from . import selectors
from .events import Event, event_publish
from .metrics import run_end_observe
from .models import Conversation, Message, Run
from .run_outcome import RunOutcome

logger = logging.getLogger(__name__)

# Unique per process, and readable in the admin: which host and pid held a run.
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

FINAL_EVENTS = {
    Run.Status.COMPLETED: "run.completed",
    Run.Status.FAILED: "run.failed",
    Run.Status.CANCELLED: "run.cancelled",
    Run.Status.LIMIT_REACHED: "run.limit_reached",
    Run.Status.BUDGET_EXCEEDED: "run.budget_exceeded",
    Run.Status.INTERRUPTED: "run.interrupted",
}

# Seqs a run's writer reserves at a time (see `Run.event_seq`): one UPDATE per this many
# events, none for nearly every run.
SEQ_BLOCK = 10_000

INTERRUPTED_CODE = "run_interrupted"
INTERRUPTED_MESSAGE = (
    "The server running this answer stopped before it finished; what it wrote after "
    "its last save is lost. Send your message again."
)
GIVEN_UP_MESSAGE = (
    "The servers running this answer stopped {times} times before it finished, so it was "
    "given up. Send your message again."
)

# How long `hand_back` waits for the runs it stops to return.
HAND_BACK_WAIT = 10.0
# How long after a lease lapses the keeper looks for it (see `LeaseKeeper._pause`).
LAPSE_MARGIN = 0.05


def _lease_expiry() -> datetime:
    return timezone.now() + timedelta(seconds=settings.AGENT_RUN_LEASE_SECONDS)


def renew_interval() -> float:
    # Two renewals may be missed (a busy database, a long pause) before the lease lapses.
    return settings.AGENT_RUN_LEASE_SECONDS / 3


# --- Transitions (services: sync, each in its own transaction) ---------------------------


def run_queued_lease() -> dict[str, Any]:
    """The lease a new run is created with: the in-process executor's (see above)."""
    return {"lease_owner": PROCESS_ID, "lease_expires_at": _lease_expiry()}


@dataclass(frozen=True)
class StartedRun:
    """A run just started, with what executing it needs (fetched in the same hop)."""

    run: Run  # its conversation and API key selected with it
    account_id: int
    user_message: Message | None
    # Earlier turns the caller brought with the message (`Message.imported`), in order.
    history: list[Message]
    # Recovered (`run_recover`) after its earlier execution had started: the runner
    # continues it from its checkpoint, and its writer numbers its events after `seq`,
    # the ceiling its earlier execution had reserved (0 for a fresh run).
    resumed: bool = False
    seq: int = 0


def run_start(*, run_id: UUID) -> StartedRun | None:
    """Mark a queued run running under this process's lease, and return it with its
    account and the message it answers; None if it is no longer queued (cancelled
    meanwhile).

    Fresh and recovered runs alike, in the same UPDATE: a recovered run keeps its
    `started_at`, and its seq ceiling is raised by a block, so its writer numbers past
    anything its earlier execution may have sent (a fresh run's ceiling is 0)."""
    started = Run.objects.filter(id=run_id, status=Run.Status.QUEUED).update(
        status=Run.Status.RUNNING,
        started_at=Coalesce(F("started_at"), Value(timezone.now()), output_field=DateTimeField()),
        lease_owner=PROCESS_ID,
        lease_expires_at=_lease_expiry(),
        event_seq=F("event_seq") + SEQ_BLOCK,
    )
    if not started:
        return None
    # Its key with it: the budget names it on every ledger row.
    run = Run.objects.select_related("conversation", "api_key").get(id=run_id)
    # Nearly always the user's message alone: one query for it and any history.
    given = list(run.messages.filter(Q(imported=True) | Q(role=Message.Role.USER)))
    # A run recovered before it ever started (its process died in between) sent nothing:
    # its old ceiling is 0, and it starts as a fresh run.
    seq = run.event_seq - SEQ_BLOCK
    return StartedRun(
        run=run,
        account_id=account_quotas_for_user(user_id=run.conversation.owner_id).account_id,
        user_message=next((m for m in given if not m.imported), None),
        history=[m for m in given if m.imported],
        resumed=seq > 0,
        seq=seq,
    )


def run_started_here() -> dict[str, Any]:
    """The fields of a run created started under this process's lease, as `run_start`
    starts a fresh run: for the in-process executor, which executes it here at once (it
    saves the hop to the database that starting it costs)."""
    return {
        "status": Run.Status.RUNNING,
        "started_at": timezone.now(),
        "event_seq": SEQ_BLOCK,
        **run_queued_lease(),
    }


def run_started_at_creation(
    *, run: Run, conversation: Conversation, account_id: int, messages: Sequence[Message]
) -> StartedRun:
    """The `StartedRun` of a run just created started (`run_started_here`), from what
    its creation wrote: `messages`, any history then the user's message; `conversation`
    as the creation left it."""
    run.conversation = conversation
    if run.api_key_id is not None:
        # Its key with it, as `run_start` selects it: the budget names it on every row.
        run.api_key = ApiKey.objects.get(id=run.api_key_id)
    *history, user_message = messages
    return StartedRun(
        run=run, account_id=account_id, user_message=user_message, history=list(history)
    )


def run_seq_reserve(*, run_id: UUID, seq: int) -> int:
    """Raise the run's seq ceiling past `seq` before its writer goes beyond it. Never
    lower it: the writer may be an execution that stalled past its lease, and a later
    one (or its recovery) numbers past the ceiling that one reserved."""
    ceiling = seq + SEQ_BLOCK
    Run.objects.filter(id=run_id, status__in=Run.ACTIVE_STATUSES).update(
        event_seq=Greatest(F("event_seq"), Value(ceiling))
    )
    return ceiling


def runs_renew(*, progress: dict[UUID, tuple[int, int]]) -> set[UUID]:
    """Renew this process's leases on these runs and record how far each got (input and
    output tokens seen so far, for settling its hold if it is recovered or interrupted).
    Returns the runs another process took over (closed as interrupted, or recovered and
    now under another lease): their executor must stop them."""
    if not progress:
        return set()
    renewed = _runs_held_update(progress=progress, lease_expires_at=_lease_expiry())
    if renewed == len(progress):
        return set()
    # Rare: a run just finished by its own executor is not lost, only one taken over.
    taken = Q(status=Run.Status.INTERRUPTED) | (
        Q(status__in=Run.ACTIVE_STATUSES) & ~Q(lease_owner=PROCESS_ID)
    )
    return set(Run.objects.filter(taken, id__in=list(progress)).values_list("id", flat=True))


def runs_hand_back(*, progress: dict[UUID, tuple[int, int]]) -> int:
    """Make this process's leases on these runs lapse now, with how far each got (as
    `runs_renew` records it): a reaper resumes them at its next tick."""
    return _runs_held_update(progress=progress, lease_expires_at=timezone.now())


def _runs_held_update(*, progress: dict[UUID, tuple[int, int]], lease_expires_at: datetime) -> int:
    """One UPDATE of the leases this process holds on these runs, and their progress."""
    held = Run.objects.filter(
        id__in=list(progress), lease_owner=PROCESS_ID, status__in=Run.ACTIVE_STATUSES
    )
    return held.update(
        lease_expires_at=lease_expires_at,
        input_tokens=Case(
            *[When(id=run_id, then=Value(seen[0])) for run_id, seen in progress.items()],
            default=F("input_tokens"),
            output_field=PositiveIntegerField(),
        ),
        output_tokens=Case(
            *[When(id=run_id, then=Value(seen[1])) for run_id, seen in progress.items()],
            default=F("output_tokens"),
            output_field=PositiveIntegerField(),
        ),
    )


def runs_lapsed(
    *, conversation_id: UUID | None = None, exclude: Iterable[UUID] = (), limit: int = 100
) -> list[UUID]:
    runs = Run.objects.lost()
    if conversation_id is not None:
        runs = runs.filter(conversation_id=conversation_id)
    exclude = list(exclude)
    if exclude:
        runs = runs.exclude(id__in=exclude)
    return list(runs.order_by("lease_expires_at").values_list("id", flat=True)[:limit])


@dataclass(frozen=True)
class LockedRun:
    """A finishing run's row, locked for the rest of the transaction (`run_lock`)."""

    run_id: UUID
    # With its conversation. None: deleted (with its conversation) while it ran.
    run: Run | None


def run_lock(*, run_id: UUID, recoveries: int | None = None) -> LockedRun | None:
    """Lock the run's row for the rest of the transaction and read it, with its
    conversation, for `run_finish`: one locking read for both. None if the run was
    recovered since the execution that started at `recoveries` (this process stalled
    past its lease): another execution holds it now, and this one must leave it, its
    holds and its trace be."""
    run = (
        Run.objects.select_for_update(of=("self",))
        .select_related("conversation")
        .filter(id=run_id)
        .first()
    )
    recovered = run is not None and run.is_active and run.recoveries != recoveries
    if recoveries is not None and recovered:
        return None
    return LockedRun(run_id=run_id, run=run)


@dataclass(frozen=True)
class RecoveredRun:
    run_id: UUID
    recoveries: int


def run_recover(*, run_id: UUID, lease: dict[str, Any]) -> "RecoveredRun | ClosedRun | None":
    """Queue again a run whose lease lapsed (its process died, or handed it back), to be
    resumed from its checkpoint; call it inside the transaction that hands it to an
    executor (`RunSubmitter.submit`). Claimed with one conditional UPDATE, so of two
    reapers exactly one recovers it; None if it was not ours to claim. `lease`: the
    executor's (`RunSubmitter.queued_lease`).

    The hold of the call that was cut is settled as `run_close` settles it (billed what
    it had streamed by the last renewal), and the run's totals become the ledger's: the
    resumed execution starts from them with no hold of its earlier one left, and bills
    each call once (the cut call what it streamed, its re-run in full).

    A run recovered AGENT_RUN_MAX_RECOVERIES times already is closed as interrupted
    instead (returns its `ClosedRun`, to publish): a run that kills its process every
    time must not loop forever."""
    limit = settings.AGENT_RUN_MAX_RECOVERIES
    lapsed = Run.objects.filter(
        id=run_id, status__in=Run.ACTIVE_STATUSES, lease_expires_at__lt=timezone.now()
    )
    claimed = lapsed.filter(recoveries__lt=limit).update(
        status=Run.Status.QUEUED, recoveries=F("recoveries") + 1, **lease
    )
    if not claimed:
        # Past its limit, closed with the same kind of claim; or not lapsed (None).
        return run_close(run_id=run_id, error_message=GIVEN_UP_MESSAGE.format(times=limit + 1))
    run = Run.objects.get(id=run_id)
    # On failure left held: the resumed execution's finish settles it with the totals.
    _holds_settle(run)
    logger.warning(
        "run %s: its lease lapsed; queued to resume (recovery %d of %d)",
        run_id,
        run.recoveries,
        limit,
    )
    return RecoveredRun(run_id=run_id, recoveries=run.recoveries)


@dataclass(frozen=True)
class FinishedRun:
    # Its budget left not read yet (`final_with_budget`).
    final: Event
    # Whose budget it shows: the conversation's owner (None: the run was deleted).
    owner_id: int | None = None
    # False: the run was deleted (with its conversation) while it ran.
    stored: bool = True

    def final_with_budget(self) -> Event:
        """The final event with what the account's budget leaves now. Call it once the
        finish has committed: read outside its transaction, it needs no savepoint, and
        it sees the ledger the finish wrote. A deleted run's budget is unknown (None)."""
        if self.owner_id is None:
            return self.final
        return {**self.final, "budget": _budget_after(self.owner_id)}


def run_finish(*, locked: LockedRun, outcome: RunOutcome, final_seq: int) -> FinishedRun | None:
    """Store what the run produced, close it and return its final event (numbered
    `final_seq`), ready to publish; in the transaction that locked it (`run_lock`).
    None if the run was already closed (interrupted by another process): it is left as
    it is. A run deleted with its conversation while it ran has nothing stored, but its
    final event all the same, for the sockets still open on it."""
    run = locked.run
    if run is None:
        gone = Run(
            id=locked.run_id,
            status=outcome.status,
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            cost_usd=outcome.cost_usd,
            error_code=outcome.error_code,
            error_message=outcome.error_message,
            event_seq=final_seq,
        )
        return FinishedRun(_final_event(gone, [], with_budget=False), stored=False)
    if not run.is_active:
        return None
    # No savepoint of its own where the finisher's transaction holds it.
    with transaction.atomic(savepoint=False):
        run.status = outcome.status
        run.finished_at = timezone.now()
        run.steps = outcome.steps
        run.input_tokens = outcome.input_tokens
        run.output_tokens = outcome.output_tokens
        run.cost_usd = outcome.cost_usd
        run.error_code = outcome.error_code
        run.error_message = text_storable(outcome.error_message)
        run.event_seq = final_seq
        run.save(
            update_fields=[
                "status",
                "finished_at",
                "steps",
                "input_tokens",
                "output_tokens",
                "cost_usd",
                "error_code",
                "error_message",
                "event_seq",
            ]
        )
        messages = [_message_from_part(run, part) for part in outcome.parts]
        created = Message.objects.bulk_create([m for m in messages if m is not None])
        Conversation.objects.filter(id=run.conversation_id).update(updated_at=timezone.now())
    answers = [m for m in created if m.role == Message.Role.ASSISTANT]
    return FinishedRun(
        _final_event(run, answers, with_budget=False), owner_id=run.conversation.owner_id
    )


def _message_from_part(run: Run, part: dict) -> Message | None:
    # What the model and the tools produced is stored as it came, but for a NUL or a
    # lone surrogate (PostgreSQL refuses them), replaced.
    part = text_storable(part)
    if part["kind"] == "text":
        if not part["text"].strip():
            return None
        return Message(
            conversation_id=run.conversation_id,
            run=run,
            role=Message.Role.ASSISTANT,
            content=part["text"],
        )
    tool = {key: part[key] for key in ("tool_call_id", "name", "args", "result", "is_error")}
    return Message(conversation_id=run.conversation_id, run=run, role=Message.Role.TOOL, tool=tool)


def _holds_settle(run: Run) -> RunCost | None:
    """Settle the holds of a run nobody executes any more from the usage its last renewal
    recorded (`usage_close_run`), and make the run's totals the ledger's; None if that
    failed (logged; the holds stay)."""
    try:
        # A savepoint: `run_create` claims lost runs inside its transaction, which a
        # database error caught here must not leave aborted (PostgreSQL).
        with transaction.atomic():
            cost = usage_close_run(
                run_id=run.id,
                seen=Usage(input_tokens=run.input_tokens, output_tokens=run.output_tokens),
            )
    except Exception:
        logger.exception("run %s: could not settle its usage", run.id)
        return None
    run.input_tokens, run.output_tokens = cost.input_tokens, cost.output_tokens
    run.cost_usd = cost.total_usd
    run.save(update_fields=["input_tokens", "output_tokens", "cost_usd"])
    return cost


@dataclass(frozen=True)
class ClosedRun:
    conversation_id: UUID
    final: Event
    # Its trace was closed here (not by its tracer), so it is exported from here too.
    trace_closed: bool = False


def run_close(
    *,
    run_id: UUID,
    status: Run.Status = Run.Status.INTERRUPTED,
    error_code: str = INTERRUPTED_CODE,
    error_message: str = INTERRUPTED_MESSAGE,
    lapsed_only: bool = True,
) -> ClosedRun | None:
    """Close a run nobody executes: claim it (only if its lease lapsed, unless
    `lapsed_only` is off), settle its hold, close its trace. Returns its final event, to
    publish; None if it was not ours to close (renewed, or closed by someone else).

    The hold of the call it was making when its process stopped is billed the prompt
    estimate and the output it had streamed by its last renewal, as a cancel is (the
    provider processed that much); a call that had streamed nothing is released. A call
    that had finished is settled with the next call's reservation or at the run's finish
    (one hop per call, not two); if the process dies before that, it is billed like a
    cut call, from the usage recorded at the last renewal."""
    now = timezone.now()
    runs = Run.objects.filter(id=run_id, status__in=Run.ACTIVE_STATUSES)
    if lapsed_only:
        runs = runs.filter(lease_expires_at__lt=now)
    # The claim: one conditional UPDATE, so of two reapers exactly one closes the run.
    claimed = runs.update(
        status=status,
        finished_at=now,
        error_code=error_code,
        error_message=error_message,
        event_seq=F("event_seq") + 1,
    )
    if not claimed:
        return None
    run = Run.objects.select_related("conversation").get(id=run_id)
    cost = _holds_settle(run)
    trace_closed = False
    if settings.TRACING_ENABLED:
        trace_closed = trace_close_interrupted(
            run_id=run_id,
            user_id=run.conversation.owner_id,
            model=run.model,
            started_at=run.started_at or run.created_at,
            error_type=error_code,
            error_message=error_message,
            status=trace_status_for(status),
            span_costs=cost.span_costs if cost else None,
            span_usage=cost.span_usage if cost else None,
            cost_usd=run.cost_usd,
        )
    return ClosedRun(
        conversation_id=run.conversation_id,
        final=_final_event(run, []),
        trace_closed=trace_closed,
    )


def run_cancel_queued(*, run_id: UUID) -> ClosedRun | None:
    """Close the run as cancelled (a user's stop) if it has not started; None otherwise.
    Its executor, when it comes to start it, finds it no longer queued."""
    with transaction.atomic():
        # Locked: `run_start` (an UPDATE ... WHERE status = queued) waits for this
        # transaction, then finds the run cancelled.
        queued = Run.objects.select_for_update().filter(id=run_id, status=Run.Status.QUEUED)
        if not queued.exists():
            return None
        return _run_close_stopped(run_id)


def run_cancel_unstarted(*, run_id: UUID) -> ClosedRun | None:
    """Close as cancelled (a user's stop) a run created started here (`run_started_here`)
    whose task was stopped before it first ran, from that task: nothing executed it, and
    nothing will."""
    return _run_close_stopped(run_id)


def _run_close_stopped(run_id: UUID) -> ClosedRun | None:
    return run_close(
        run_id=run_id,
        status=Run.Status.CANCELLED,
        error_code="cancelled",
        error_message="Stopped by the user.",
        lapsed_only=False,
    )


def run_final_event_rebuilt(*, run: Run) -> Event:
    """The final event of a finished run, rebuilt from the database (its log is gone)."""
    answers = list(run.messages.filter(role=Message.Role.ASSISTANT, imported=False))
    return _final_event(run, answers)


def _final_event(run: Run, answers: Sequence[Message], *, with_budget: bool = True) -> Event:
    """Data only: the browser adapter (`chat.presentation`) renders and words it."""
    status = Run.Status(run.status)
    event: Event = {
        "type": FINAL_EVENTS[status],
        "run": str(run.id),
        "seq": run.event_seq,
        "status": status.value,
        "messages": [message_out(m.id, m.content) for m in answers],
        "usage": {
            "input_tokens": run.input_tokens,
            "output_tokens": run.output_tokens,
            "total_tokens": run.input_tokens + run.output_tokens,
        },
        # A decimal string (exact, unlike a JSON number); null: unpriced, not free.
        "cost_usd": None if run.cost_usd is None else format(run.cost_usd, "f"),
    }
    if run.error_code:
        event["error"] = {"code": run.error_code, "message": run.error_message}
    # After the ledger: what is left now, for the page's budget line. None: unknown.
    event["budget"] = _budget_after(run.conversation.owner_id) if with_budget else None
    return event


def _budget_after(user_id: int) -> dict[str, Any] | None:
    """`{"left": …}`, the account's `BudgetLeft` data (None: it has no limits). A failure
    here is logged and loses the line, never the final event: in a savepoint where a
    transaction is open (as in `run_close`), which a failed read must not abort."""
    try:
        with transaction.atomic() if connection.in_atomic_block else nullcontext():
            left = selectors.budget_left(user_id=user_id)
    except Exception:
        logger.exception("could not work out the budget left of user %s", user_id)
        return None
    return {"left": left.as_data() if left is not None else None}


def message_out(message_id: int, content: str) -> dict[str, Any]:
    return {"id": message_id, "content": content}


# --- Closing runs nobody executes (async: they publish their final event) --------------


async def run_close_and_publish(**close: Any) -> bool:
    """`run_close`, then its final event to the log and the conversation's sockets."""
    closed = await database_sync_to_async(run_close)(**close)
    if closed is None:
        return False
    await run_closed_publish(closed)
    return True


async def run_closed_publish(closed: ClosedRun) -> None:
    logger.warning(
        "run %s closed as %s (%s)",
        closed.final["run"],
        closed.final["status"],
        closed.final.get("error", {}).get("code", ""),
    )
    run_end_observe(
        status=closed.final["status"], error_code=closed.final.get("error", {}).get("code", "")
    )
    await event_publish(closed.conversation_id, closed.final)
    if closed.trace_closed:
        await schedule_stored(
            trace_id=UUID(closed.final["run"]), conversation_id=closed.conversation_id
        )


class RunSubmitter(Protocol):
    """What recovering a run needs of an executor (`chat.agent.executor`'s protocol),
    handed to the keeper when it starts: this module must not import the executors,
    which execute runs through it."""

    def queued_lease(self) -> dict[str, Any]: ...

    def submit(self, run_id: UUID) -> None: ...


@dataclass(frozen=True)
class Reaped:
    recovered: list[UUID]
    # Past their recoveries limit: their final events are the caller's to publish.
    closed: list[ClosedRun]


def runs_recover_lapsed(*, executor: RunSubmitter, conversation_id: UUID | None = None) -> Reaped:
    """Recover every run whose lease lapsed (of one conversation, or all) and hand each
    to `executor`, each in its own transaction, so the run and its submission commit
    together (`run_recover`). Not the runs this process executes: a lease of theirs
    lapsed only because this process stalled, and they are still going here (recovered
    here, they would run twice in this process)."""
    reaped = Reaped(recovered=[], closed=[])
    held = _keeper.held()
    for run_id in runs_lapsed(conversation_id=conversation_id, exclude=held):
        with transaction.atomic():
            result = run_recover(run_id=run_id, lease=executor.queued_lease())
            if isinstance(result, RecoveredRun):
                executor.submit(run_id)
                reaped.recovered.append(run_id)
            elif result is not None:
                reaped.closed.append(result)
    return reaped


async def runs_reap(*, executor: RunSubmitter) -> int:
    """`runs_recover_lapsed`, then the final events of those closed; how many in all."""
    reaped, _ = await _reap(executor)
    return len(reaped.recovered) + len(reaped.closed)


async def _reap(executor: RunSubmitter) -> tuple[Reaped, datetime | None]:
    """`runs_reap`, and when the next lease of an active run lapses (None: no lease)."""
    reaped, next_lapse = await _on_keeper_thread(_recover_lapsed_and_next)(executor=executor)
    for run in reaped.closed:
        await run_closed_publish(run)
    return reaped, next_lapse


def _recover_lapsed_and_next(*, executor: RunSubmitter) -> tuple[Reaped, datetime | None]:
    reaped = runs_recover_lapsed(executor=executor)
    current = Run.objects.filter(
        status__in=Run.ACTIVE_STATUSES, lease_expires_at__gte=timezone.now()
    )
    next_lapse: datetime | None = current.aggregate(at=Min("lease_expires_at"))["at"]
    return reaped, next_lapse


def final_event_missing(*, run: Run, events: list[Event], after_seq: int) -> Event | None:
    """The final event a client asking for events after `after_seq` is owed but the log
    no longer has (Redis restarted, the event expired, or publishing it failed): rebuilt
    from the database. None while the run is active, or when the log has it."""
    if run.is_active or after_seq >= run.event_seq:
        return None
    if any(event["seq"] == run.event_seq for event in events):
        return None
    return run_final_event_rebuilt(run=run)


@dataclass(frozen=True)
class RunEnd:
    """What the database says of a run to a follower that has its events up to some seq
    and found no more in the log (see `chat.events.follow`).

    `over`: the run is over; `final`: the final event the follower is owed and the log
    lacks, rebuilt; None while `settling` (seconds) is left, in which the run's final
    event may still reach the log: a run is recorded as over just before its last events
    and its final event are published. `deleted`: the run is gone with its conversation
    (its executor, if it still runs it, publishes a final event nothing can rebuild)."""

    over: bool
    final: Event | None = None
    settling: float = 0.0
    deleted: bool = False


def run_end_owed(*, run_id: UUID, after_seq: int, grace: float) -> RunEnd:
    run = Run.objects.select_related("conversation").filter(id=run_id).first()
    if run is None:
        return RunEnd(over=True, deleted=True)
    if run.is_active:
        return RunEnd(over=False)
    if run.finished_at is not None:
        settling = grace - (timezone.now() - run.finished_at).total_seconds()
        if settling > 0 and after_seq < run.event_seq:
            return RunEnd(over=True, settling=settling)
    return RunEnd(over=True, final=final_event_missing(run=run, events=[], after_seq=after_seq))


# --- The keeper: heartbeat and reaper of one process ------------------------------------


@dataclass
class _Lease:
    on_lost: Callable[[], Any]
    outcome: RunOutcome | None = None
    # Anything with a `flush()`: the run's tracer, flushed on every renewal.
    tracer: Any = None
    # Set when its executor releases it (its task is over).
    released: asyncio.Event = field(default_factory=asyncio.Event)


class LeaseKeeper:
    """Renews the leases this process holds, flushes their traces, and reaps runs whose
    lease lapsed (recovering them into the executor it was started with), every
    `renew_interval()` seconds, as a task on the serving loop."""

    def __init__(self) -> None:
        self._held: dict[UUID, _Lease] = {}
        self._task: asyncio.Task[None] | None = None
        self._executor: RunSubmitter | None = None
        # Handed back and not yet released: their executor returns without finishing them.
        self._handed_back: dict[UUID, _Lease] = {}
        # When the next lease of an active run lapses, as the last tick saw it.
        self._next_lapse: datetime | None = None
        # Off once this process stops (`reaping_stop`).
        self._reaping = True

    def hold(self, run_id: UUID, *, on_lost: Callable[[], Any]) -> None:
        """Renew the run's lease until `release`; `on_lost` stops it if another process
        closes it meanwhile (this process stalled past its lease)."""
        self._held[run_id] = _Lease(on_lost=on_lost)

    def attach(self, run_id: UUID, *, outcome: RunOutcome, tracer: Any = None) -> None:
        """What the run has produced so far (recorded on renewal) and its tracer."""
        lease = self._held.get(run_id)
        if lease is not None:
            lease.outcome, lease.tracer = outcome, tracer

    def release(self, run_id: UUID) -> None:
        lease = self._held.pop(run_id, None) or self._handed_back.pop(run_id, None)
        if lease is not None:
            lease.released.set()

    def held(self) -> list[UUID]:
        """The runs this process executes, those it is handing back included until they
        stop (safe to call from any thread)."""
        return [*self._held, *self._handed_back]

    def handed_back(self, run_id: UUID) -> bool:
        """Whether the run was handed back (`hand_back`): its executor stops it without
        finishing it."""
        return run_id in self._handed_back

    async def hand_back(
        self, run_ids: Iterable[UUID] | None = None, *, cause: str = "shutdown"
    ) -> None:
        """Give back runs this process executes (None: all of them), for a process that
        stops on purpose (a worker's drain, a web instance's shutdown): their tasks are
        stopped without finishing the runs (no final event, no ledger close; their
        traces flushed), then their leases lapse now, in one UPDATE that records how
        far each got. Any process's reaper resumes them at its next tick."""
        ids = [
            run_id
            for run_id in (self._held if run_ids is None else run_ids)
            if run_id in self._held
        ]
        if not ids:
            return
        leases = {run_id: self._held.pop(run_id) for run_id in ids}
        self._handed_back.update(leases)
        logger.warning("handing back %d runs (%s): %s", len(ids), cause, ", ".join(map(str, ids)))
        for lease in leases.values():
            lease.on_lost()
        stopped = [asyncio.ensure_future(lease.released.wait()) for lease in leases.values()]
        _, late = await asyncio.wait(stopped, timeout=HAND_BACK_WAIT)
        for waiting in late:
            waiting.cancel()
        if late:
            logger.warning(
                "%d handed back runs did not stop within %g s", len(late), HAND_BACK_WAIT
            )
        progress = {run_id: _progress(lease.outcome) for run_id, lease in leases.items()}
        await _on_keeper_thread(runs_hand_back)(progress=progress)

    def reaping_stop(self) -> None:
        """For a process that is stopping: it recovers no more runs, above all not those
        it hands back (the in-process executor would start them here, to die with it a
        moment later and be found only a lease after). It still renews what it holds."""
        self._reaping = False

    def ensure_started(self, executor: RunSubmitter) -> None:
        """Start on the running loop, unless running there already (call it from it).
        `executor`: where the runs it recovers go."""
        self._executor = executor
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self._task = loop.create_task(
            self._keep(), name="run-lease-keeper", context=contextvars.Context()
        )

    async def _keep(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the database is down, say: try again next time
                logger.exception("run lease keeper: tick failed")
            await asyncio.sleep(self._pause())

    def _pause(self) -> float:
        """Until the next renewal, or until just after the next lease lapses if that is
        sooner: a run whose process died is resumed within a lease of its last renewal,
        not a lease and a renewal interval. Live processes renew their leases well before
        they lapse, so this wakes the keeper early only for a process that stopped."""
        pause = renew_interval()
        if self._next_lapse is not None:
            due = (self._next_lapse - timezone.now()).total_seconds() + LAPSE_MARGIN
            pause = min(pause, max(due, LAPSE_MARGIN))
        return pause

    async def tick(self) -> None:
        progress = {run_id: _progress(lease.outcome) for run_id, lease in list(self._held.items())}
        lost = await _on_keeper_thread(runs_renew)(progress=progress)
        for run_id in lost:
            lease = self._held.pop(run_id, None)
            if lease is not None:
                logger.warning("run %s: its lease was taken over; stopping it", run_id)
                lease.on_lost()
        for lease in list(self._held.values()):
            if lease.tracer is not None:
                lease.tracer.flush()
        if self._executor is not None and self._reaping:
            _, self._next_lapse = await _reap(self._executor)
        else:  # wakes for renewals alone
            self._next_lapse = None


def _progress(outcome: RunOutcome | None) -> tuple[int, int]:
    if outcome is None:
        return 0, 0
    return outcome.input_tokens, outcome.output_tokens + outcome.unreported_output_tokens


_keeper = LeaseKeeper()
# The keeper renews and reaps on a thread (and a database connection) of its own rather
# than the database thread every run's queries queue on: with hundreds of runs at once
# that queue can fall more than a lease behind, and this process's reaper (or another's)
# would find the leases of runs this process is executing lapsed, and close them.
_keeper_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-lease-keeper")


def _on_keeper_thread(func: Callable[..., Any]) -> Callable[..., Any]:
    return database_sync_to_async(func, thread_sensitive=False, executor=_keeper_thread)


def lease_keeper() -> LeaseKeeper:
    return _keeper


def lease_keeper_start_with_server(executor: RunSubmitter) -> None:
    """Start the keeper when the server's loop starts, before any request: so a process
    that restarts after a crash resumes the crashed runs without waiting for a user.

    Daphne has no ASGI lifespan events, but serves on Twisted's asyncio reactor, which
    runs what `callLater` schedules once it is running. Under another server (or none:
    the tests) the keeper starts on first use instead (`ensure_started`)."""
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is not None and type(reactor).__name__ == "AsyncioSelectorReactor":
        reactor.callLater(0, _keeper.ensure_started, executor)  # type: ignore[attr-defined]
