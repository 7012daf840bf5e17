"""The run's life: leases renewed by the process executing a run, runs whose process
died resumed (or, past their recoveries limit, reaped as `interrupted`: hold settled,
trace closed, final event published), and final events rebuilt from the database when
the event log lost them. The resuming itself: test_recovery.py."""

import asyncio
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from unittest import mock

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.utils import timezone
from prometheus_client import REGISTRY

from billing.budget import budget_reserve
from billing.models import BudgetReservation, UsageRecord
from billing.tests.conftest import prices  # noqa: F401 (a fixture)
from chat import events, lifecycle, services
from chat.agent.executor import get_executor
from chat.agent.host import run_host
from chat.events import MemoryEventLog, RunEventStream, event_log
from chat.models import Run
from chat.run_outcome import RunOutcome
from conftest import account_with_limits, open_socket, receive_until, wait_for_runs
from tests.conftest import _free_port
from tracing import export
from tracing.models import Span, Trace
from tracing.tests import test_export

pytestmark = pytest.mark.django_db(transaction=True)

collector = test_export.collector  # a fixture: an OTLP receiver

MODEL = "agentsite-offline-demo"
MAX_RECOVERIES = 3  # AGENT_RUN_MAX_RECOVERIES's default


async def reap() -> int:
    return await lifecycle.runs_reap(executor=get_executor())


async def connected(user):
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    assert (await socket.receive_json_from())["type"] == "session"
    return conversation, socket


@pytest.fixture
def keeper_held_off(monkeypatch):
    """For tests that reap an orphan themselves: the keeper the socket starts would
    race them to it."""

    async def no_tick(keeper) -> None:
        return None

    monkeypatch.setattr(lifecycle.LeaseKeeper, "tick", no_tick)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def orphan(conversation, *, lapsed_seconds: float = 1, **fields) -> Run:
    """A run whose process died: running under a lease nobody renews. With
    `recoveries=MAX_RECOVERIES` it was resumed as often as it may be."""
    started = timezone.now() - timedelta(seconds=30)
    return Run.objects.create(
        conversation=conversation,
        model=MODEL,
        status=Run.Status.RUNNING,
        started_at=started,
        lease_owner="dead-host:4242:0badf00d",
        lease_expires_at=timezone.now() - timedelta(seconds=lapsed_seconds),
        event_seq=lifecycle.SEQ_BLOCK,
        **fields,
    )


def with_hold_and_trace(run: Run, user, *, call_id: uuid.UUID | None = None, **span) -> None:
    """What the dead process left: a hold on its cut call (`call_id`), a running trace
    with the span it flushed before it died (a tool call's, unless `span` says else)."""
    account = account_with_limits(user, money_per_day_usd=Decimal(1))
    budget_reserve(
        account_id=account.id,
        user_id=user.id,
        run_id=run.id,
        call_id=call_id or uuid.uuid4(),
        model=MODEL,
        prompt_tokens=500,
        max_output_tokens=1024,
    )
    assert run.started_at is not None
    trace = Trace.objects.create(run=run, user=user, model=MODEL, started_at=run.started_at)
    fields = {
        "parent_id": run.id,  # the root span's id is the run's
        "kind": Span.Kind.TOOL,
        "name": "calculator",
        "started_at": run.started_at,
        "ended_at": run.started_at,
        "duration_ms": 1.0,
    }
    Span.objects.create(trace=trace, **(fields | span))


@pytest.mark.usefixtures("prices")
async def test_the_reaper_interrupts_a_run_past_its_recoveries_limit(make_user, keeper_held_off):
    user = await database_sync_to_async(make_user)()
    conversation, socket = await connected(user)
    # Its last renewal recorded 9 streamed tokens of the call it was making; it had
    # killed its process (or been cut) as often as a run may be resumed.
    run = await database_sync_to_async(orphan)(
        conversation, output_tokens=9, recoveries=MAX_RECOVERIES
    )
    await database_sync_to_async(with_hold_and_trace)(run, user)

    assert await reap() == 1

    # The socket learns it at once, numbered after anything the dead process sent.
    [final] = await receive_until(socket, "run.interrupted")
    assert final["run"] == str(run.id) and final["seq"] == lifecycle.SEQ_BLOCK + 1
    assert final["error"]["code"] == "run_interrupted"
    assert "stopped 4 times" in final["error"]["message"]
    run = await Run.objects.aget(id=run.id)
    assert run.status == Run.Status.INTERRUPTED and run.finished_at is not None
    assert run.recoveries == MAX_RECOVERIES
    # The cause stays recorded: whose lease lapsed, and when.
    assert run.lease_owner == "dead-host:4242:0badf00d" and run.lease_expires_at is not None
    assert run.event_seq == final["seq"]
    # The hold is settled for the prompt and what was streamed, like a cancelled call.
    assert not await BudgetReservation.objects.filter(run_id=run.id).aexists()
    record = await UsageRecord.objects.aget(run_id=run.id)
    assert (record.input_tokens, record.output_tokens) == (500, 9)
    assert run.cost_usd == record.cost_usd and final["cost_usd"] == str(record.cost_usd)
    trace = await Trace.objects.aget(run_id=run.id)
    assert trace.status == Trace.Status.ERROR and trace.error_type == "run_interrupted"
    assert trace.ended_at is not None
    # The span it flushed, under the root span its tracer never wrote.
    root = await Span.objects.aget(id=run.id)
    assert root.kind == Span.Kind.RUN and root.status == Span.Status.ERROR
    assert trace.span_count == 2
    assert await Span.objects.filter(trace_id=run.id, parent_id=run.id).acount() == 1
    # Its log has the final event for any socket that resumes later.
    assert [f.type for f in await event_log().after(run.id, 0)] == ["run.interrupted"]
    # The conversation is usable again.
    await socket.send_json_to({"type": "message", "content": "Hello again"})
    assert (await receive_until(socket, "run.completed"))[-1]["status"] == "completed"
    await wait_for_runs()
    await socket.disconnect()


@pytest.mark.usefixtures("prices")
async def test_an_interrupted_trace_counts_the_tokens_the_ledger_billed(make_user):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(orphan)(
        conversation, output_tokens=9, recoveries=MAX_RECOVERIES
    )
    # The LLM span of the call it was making, flushed without usage (a call cut short
    # reports none to the callbacks).
    call_id = uuid.uuid4()
    await database_sync_to_async(with_hold_and_trace)(
        run, user, call_id=call_id, id=call_id, kind=Span.Kind.LLM, name="model"
    )

    assert await reap() == 1

    record = await UsageRecord.objects.aget(run_id=run.id)
    span = await Span.objects.aget(id=call_id)
    assert (span.input_tokens, span.output_tokens) == (500, 9)
    assert span.cost_usd == record.cost_usd
    trace = await Trace.objects.aget(run_id=run.id)
    assert (trace.input_tokens, trace.output_tokens) == (500, 9)
    assert trace.cost_usd == record.cost_usd


async def test_a_reaped_run_is_counted_by_its_status_and_error(make_user):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    await database_sync_to_async(orphan)(conversation, recoveries=MAX_RECOVERIES)
    interrupted = sample("agentsite_runs_total", status="interrupted")
    errors = sample("agentsite_run_errors_total", code="run_interrupted")

    assert await reap() == 1

    assert sample("agentsite_runs_total", status="interrupted") == interrupted + 1
    assert sample("agentsite_run_errors_total", code="run_interrupted") == errors + 1


@pytest.mark.usefixtures("prices")
async def test_an_interrupted_trace_is_exported_over_otlp(make_user, collector):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(orphan)(conversation, recoveries=MAX_RECOVERIES)
    await database_sync_to_async(with_hold_and_trace)(run, user)

    assert await reap() == 1
    await export.drain()

    spans = {span.name: span for span in test_export.received_spans(collector)}
    assert set(spans) == {"invoke_agent agentsite", "execute_tool calculator"}
    root = spans["invoke_agent agentsite"]
    assert root.status.code == root.status.STATUS_CODE_ERROR
    assert spans["execute_tool calculator"].parent_span_id == root.span_id
    # Closed once: reaping again exports nothing more.
    assert await reap() == 0
    await export.drain()
    assert len(test_export.received_spans(collector)) == 2


async def test_a_run_is_closed_once_by_two_reapers(make_user):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(orphan)(conversation)

    closed = [await database_sync_to_async(lifecycle.run_close)(run_id=run.id) for _ in range(2)]

    assert closed[0] is not None and closed[1] is None


async def test_runs_with_a_live_lease_or_waiting_in_a_queue_are_not_reaped(make_user):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    await database_sync_to_async(orphan)(conversation, lapsed_seconds=-60)
    # Queued long ago, with no lease: it waits in a queue, which holds it.
    queued = await Run.objects.acreate(conversation=conversation, model=MODEL)
    await Run.objects.filter(id=queued.id).aupdate(created_at=timezone.now() - timedelta(hours=1))

    assert await reap() == 0

    assert {r.status async for r in Run.objects.all()} == {Run.Status.RUNNING, Run.Status.QUEUED}


async def test_stop_on_a_lost_run_closes_it_as_cancelled_with_a_frame_and_a_closed_trace(
    make_user, keeper_held_off
):
    user = await database_sync_to_async(make_user)()
    conversation, socket = await connected(user)
    run = await database_sync_to_async(orphan)(conversation)
    await Trace.objects.acreate(run=run, user=user, model=MODEL, started_at=run.started_at)

    await socket.send_json_to({"type": "cancel", "run": str(run.id)})

    # The user stopped it before any reaper resumed it: it stays stopped.
    [final] = await receive_until(socket, "run.cancelled")
    assert final["run"] == str(run.id)
    assert (await Run.objects.aget(id=run.id)).status == Run.Status.CANCELLED
    assert await reap() == 0
    assert (await Trace.objects.aget(run_id=run.id)).status == Trace.Status.CANCELLED
    await socket.disconnect()


async def test_a_stop_before_the_run_s_task_first_runs_ends_it_cancelled(
    make_user, keeper_held_off
):
    user = await database_sync_to_async(make_user)()
    conversation, socket = await connected(user)
    with mock.patch.object(get_executor(), "submit") as submit:
        run = await database_sync_to_async(services.run_create)(
            conversation=conversation, content="Tell me about yourself"
        )
    # Created started (this process hears every stop), not queued: no stop can close it
    # as queued.
    assert run.status == Run.Status.RUNNING
    # What submit does once the run is committed: its task is created; and the stop
    # lands in the same turn of the loop, before the task first runs.
    run_host().start(run.id, submit.call_args.kwargs["started"])
    assert await run_host().cancel_local(run.id)

    [final] = await receive_until(socket, "run.cancelled")
    assert final["run"] == str(run.id) and final["error"]["code"] == "cancelled"
    await wait_for_runs()
    assert (await Run.objects.aget(id=run.id)).status == Run.Status.CANCELLED
    # Nothing is left to resume it, nor anything else after its final event.
    assert await reap() == 0
    assert [f.type for f in await event_log().after(run.id, 0)] == ["run.cancelled"]
    await socket.disconnect()


async def test_a_socket_that_connects_resumes_the_lost_run_and_follows_it(make_user):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(orphan)(conversation)
    await conversation.messages.acreate(run=run, role="user", content="What is 17 * 23?")

    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    session = await socket.receive_json_from()
    # The page had it as its active run, and the browser saw 57 of its events.
    await socket.send_json_to({"type": "resume", "run": str(run.id), "after_seq": 57})

    # The page reloaded sees it continue: resumed (afresh: it died before its first
    # checkpoint), numbered past anything its dead process sent.
    assert session["active_run"] == str(run.id)
    frames = await receive_until(socket, "run.completed")
    assert frames[0]["type"] == "run.resumed" and frames[0]["seq"] == lifecycle.SEQ_BLOCK + 1
    assert "391" in frames[-1]["messages"][0]["content"]
    await wait_for_runs()
    # It died before its trace row was written: the resumed run writes one.
    assert (await Trace.objects.aget(run_id=run.id)).status == Trace.Status.OK
    await socket.disconnect()


async def test_the_keeper_renews_what_it_holds_and_stops_what_it_lost(make_user, settings):
    settings.AGENT_RUN_LEASE_SECONDS = 30
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    mine = await database_sync_to_async(orphan)(conversation, lapsed_seconds=-1)
    taken = await database_sync_to_async(orphan)(conversation, lapsed_seconds=-1)
    await Run.objects.filter(id__in=[mine.id, taken.id]).aupdate(lease_owner=lifecycle.PROCESS_ID)
    # Another process took `taken` for dead (this one stalled past its lease).
    await Run.objects.filter(id=taken.id).aupdate(status=Run.Status.INTERRUPTED)
    keeper = lifecycle.LeaseKeeper()
    stopped = []
    keeper.hold(mine.id, on_lost=lambda: stopped.append("mine"))
    keeper.hold(taken.id, on_lost=lambda: stopped.append("taken"))
    keeper.attach(mine.id, outcome=RunOutcome(input_tokens=40, output_tokens=3))

    await keeper.tick()

    mine = await Run.objects.aget(id=mine.id)
    assert mine.lease_expires_at > timezone.now() + timedelta(seconds=20)
    assert (mine.input_tokens, mine.output_tokens) == (40, 3)
    assert stopped == ["taken"]


async def test_a_run_outlives_its_lease_while_its_process_renews_it(make_user, settings):
    # Long enough that a stalled loop on a busy machine does not lapse it; the run, about
    # 6 s, still lasts four leases.
    settings.AGENT_RUN_LEASE_SECONDS = 1.5
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.1
    user = await database_sync_to_async(make_user)()
    conversation, socket = await connected(user)

    await socket.send_json_to({"type": "message", "content": "Tell me about yourself"})
    frames = await receive_until(socket, "run.completed", wait=30)

    assert frames[-1]["status"] == "completed"
    assert (await Run.objects.aget(conversation=conversation)).status == Run.Status.COMPLETED
    await socket.disconnect()


async def test_a_run_keeps_its_lease_while_the_database_thread_lags(make_user, settings):
    # Hundreds of runs at once can keep the one database thread seconds behind. The
    # process is alive and executing its runs all the while: they must not be reaped.
    settings.AGENT_RUN_LEASE_SECONDS = 1.5
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    conversation, socket = await connected(user)
    await socket.send_json_to({"type": "message", "content": "What is 17 * 23?"})
    await receive_until(socket, "token")

    # Every call to the database thread now waits behind 3 s of others' work: twice
    # the lease between one renewal and the next reap.
    lagging = time.monotonic() + 6

    async def busy() -> None:
        while time.monotonic() < lagging:
            await database_sync_to_async(time.sleep)(0.05)

    await asyncio.gather(*(busy() for _ in range(60)))
    frames = await receive_until(socket, "run.completed", wait=20)

    assert frames[-1]["status"] == "completed"
    assert (await Run.objects.aget(conversation=conversation)).status == Run.Status.COMPLETED
    await socket.disconnect()


async def test_spans_are_written_while_the_run_goes(make_user, settings):
    settings.AGENT_RUN_LEASE_SECONDS = 1.5  # renewed (and flushed) every 0.5 s
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.1
    user = await database_sync_to_async(make_user)()
    conversation, socket = await connected(user)

    await socket.send_json_to({"type": "message", "content": "What is 17 * 23? Explain."})
    await receive_until(socket, "tool.finished")
    run = await Run.objects.aget(conversation=conversation)

    # Flushed on a lease renewal, long before the run ends (a crash now keeps them).
    for _ in range(300):
        if await Span.objects.filter(trace_id=run.id, kind=Span.Kind.TOOL).aexists():
            break
        await receive_until(socket, "token")
    assert (await Run.objects.aget(id=run.id)).status == Run.Status.RUNNING
    assert (await Trace.objects.aget(run_id=run.id)).status == Trace.Status.RUNNING
    await receive_until(socket, "run.completed", wait=30)
    await socket.disconnect()


async def test_a_finished_run_whose_log_is_gone_still_yields_its_final_event(
    make_user, monkeypatch
):
    user = await database_sync_to_async(make_user)()
    conversation, socket = await connected(user)
    await socket.send_json_to({"type": "message", "content": "What is 17 * 23?"})
    completed = (await receive_until(socket, "run.completed"))[-1]
    await socket.disconnect()
    # The log is lost (Redis restarted empty).
    monkeypatch.setattr(events, "_log", MemoryEventLog(ttl=60))

    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    await socket.send_json_to({"type": "resume", "run": completed["run"], "after_seq": 3})
    # Rebuilt once the run's last events had time to reach the log (FOLLOW_FINAL_GRACE).
    rebuilt = await socket.receive_json_from(timeout=10)
    # A client that has it already gets nothing twice.
    await socket.send_json_to(
        {"type": "resume", "run": completed["run"], "after_seq": completed["seq"]}
    )

    assert {k: v for k, v in rebuilt.items() if k != "budget"} == {
        k: v for k, v in completed.items() if k != "budget"
    }
    assert await socket.receive_nothing(timeout=0.5)
    await socket.disconnect()


async def test_a_run_goes_on_when_its_events_cannot_be_logged(make_user, monkeypatch):
    # A real Redis client to a port nothing listens on: Redis is down.
    down = events.RedisEventLog(f"redis://127.0.0.1:{_free_port()}/0", ttl=60)
    monkeypatch.setattr(events, "_log", down)
    user = await database_sync_to_async(make_user)()
    conversation, socket = await connected(user)

    await socket.send_json_to({"type": "message", "content": "What is 17 * 23?"})
    frames = await receive_until(socket, "run.completed")

    assert frames[-1]["status"] == "completed" and "error" not in frames[-1]
    run = await Run.objects.aget(conversation=conversation)
    assert run.status == Run.Status.COMPLETED
    # A client that missed the end while Redis was out learns it from the database.
    late = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await late.receive_json_from()
    await late.send_json_to({"type": "resume", "run": str(run.id), "after_seq": 0})
    assert (await late.receive_json_from())["type"] == "run.completed"
    for each in (socket, late):
        await each.disconnect()


async def test_a_socket_following_a_run_learns_its_end_while_nothing_can_be_published(
    make_user, settings, monkeypatch
):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.02
    monkeypatch.setattr(events, "FOLLOW_CHECK_INTERVAL", 0.1)
    user = await database_sync_to_async(make_user)()
    _, socket = await connected(user)
    await socket.send_json_to({"type": "message", "content": "Tell me about yourself"})
    await receive_until(socket, "token")

    # Redis goes down mid-run: neither the log nor the channel layer takes the rest.
    down = events.RedisEventLog(f"redis://127.0.0.1:{_free_port()}/0", ttl=60)
    monkeypatch.setattr(events, "_log", down)

    async def refused(group: str, message: dict) -> None:
        raise ConnectionError("Redis is down")

    monkeypatch.setattr(get_channel_layer(), "group_send", refused)

    # The socket follows the run to its end all the same, learnt from the database.
    frames = await receive_until(socket, "run.completed", wait=30)
    assert frames[-1]["status"] == "completed"
    await socket.disconnect()
    await wait_for_runs()


async def test_a_writer_reserves_more_seqs_before_passing_its_ceiling(make_user):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await Run.objects.acreate(
        conversation=conversation, model=MODEL, status=Run.Status.RUNNING, event_seq=2
    )

    async def reserve(seq: int) -> int:
        return await database_sync_to_async(lifecycle.run_seq_reserve)(run_id=run.id, seq=seq)

    stream = RunEventStream(run.id, conversation.id, ceiling=2, reserve=reserve)
    for _ in range(3):
        await stream.emit("token", text="x")

    assert (await Run.objects.aget(id=run.id)).event_seq == 2 + lifecycle.SEQ_BLOCK


async def test_a_run_taken_over_while_its_process_stalled_is_stopped_there(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    _, socket = await connected(user)
    await socket.send_json_to({"type": "message", "content": "Tell me about yourself"})
    run_id = (await receive_until(socket, "token"))[-1]["run"]
    await receive_until(socket, "token")  # its trace row is written by now

    # Another process found its lease lapsed (this one was stalled) and closed it.
    assert await lifecycle.run_close_and_publish(run_id=uuid.UUID(run_id), lapsed_only=False)
    await lifecycle.lease_keeper().tick()  # this process's next renewal finds it gone
    await wait_for_runs()

    frames = await receive_until(socket, "run.interrupted")
    assert not [f for f in frames if f["type"] in lifecycle.FINAL_EVENTS.values()][:-1]
    assert await socket.receive_nothing(timeout=0.5)  # no second ending
    assert (await Run.objects.aget(id=run_id)).status == Run.Status.INTERRUPTED
    trace = await Trace.objects.aget(run_id=run_id)
    assert trace.status == Trace.Status.ERROR and trace.error_type == "run_interrupted"
    await socket.disconnect()


def test_the_page_shows_an_interrupted_run_as_such(client, make_user):
    user = make_user()
    conversation = services.conversation_create(owner=user)
    run = orphan(conversation)
    conversation.messages.create(run=run, role="user", content="Tell me about yourself")
    lifecycle.run_close(run_id=run.id)
    client.force_login(user)

    page = client.get(f"/c/{conversation.id}/").content.decode()

    assert '<span class="run-status">Interrupted</span>' in page
    assert "stopped before it finished" in page
    assert 'data-active-run=""' in page
