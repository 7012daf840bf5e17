"""Runs recovered after their process died or handed them back: claimed by exactly one
reaper, resumed from their own checkpoint (no completed step run again) with their
answer whole and each call billed once, or closed as interrupted past their limit."""

import asyncio
import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.test import Client
from django.utils import timezone

from agentsite.errors import ApplicationError
from billing.models import BudgetReservation, UsageRecord
from billing.tests.conftest import prices  # noqa: F401 (a fixture)
from chat import lifecycle, services
from chat.agent import offline_model
from chat.agent.executor import get_executor
from chat.agent.host import RunHost
from chat.events import event_log, follow
from chat.models import Message, Run
from conftest import account_with_limits, wait_for_runs
from tracing.models import Span, Trace

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "agentsite-offline-demo"


@pytest.fixture
def model_calls(monkeypatch):
    """The offline model's calls, counted as they start."""
    calls: list[str] = []
    stream = offline_model.OfflineChatModel._astream

    def counted(self, messages, *args, **kwargs):
        calls.append(type(messages[-1]).__name__)
        return stream(self, messages, *args, **kwargs)

    monkeypatch.setattr(offline_model.OfflineChatModel, "_astream", counted)
    return calls


@pytest.fixture
def keeper_held_off(monkeypatch):
    """The tests reap themselves: the keeper would race them to it."""

    async def no_tick(keeper) -> None:
        return None

    monkeypatch.setattr(lifecycle.LeaseKeeper, "tick", no_tick)


def lapsed_run(conversation, **fields) -> Run:
    """A run whose process died: active under a lease nobody renews."""
    return Run.objects.create(
        conversation=conversation,
        model=MODEL,
        **{
            "status": Run.Status.RUNNING,
            "started_at": timezone.now() - timedelta(seconds=30),
            "lease_owner": "dead-host:4242:0badf00d",
            "lease_expires_at": timezone.now() - timedelta(seconds=1),
            "event_seq": lifecycle.SEQ_BLOCK,
            **fields,
        },
    )


async def events_of(run_id: uuid.UUID) -> list[dict]:
    return [frame.event() async for frame in follow(run_id) if frame is not None]


async def run_until(run: Run, *, tokens_after_tool: int) -> None:
    """Follow the run until its answer after the tool call has streamed a little."""
    seen_tool, tokens = False, 0
    async for frame in follow(run.id):
        if frame is None:
            continue
        seen_tool = seen_tool or frame.type == "tool.finished"
        tokens += seen_tool and frame.type == "token"
        if tokens >= tokens_after_tool:
            return


@pytest.mark.usefixtures("prices")
async def test_a_run_handed_back_mid_answer_is_resumed_from_its_checkpoint(
    make_user, settings, model_calls, keeper_held_off
):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    await database_sync_to_async(account_with_limits)(user)
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(services.run_create)(
        conversation=conversation, content="What is 17 * 23?"
    )
    await run_until(run, tokens_after_tool=3)

    await lifecycle.lease_keeper().hand_back([run.id], cause="test")

    # Handed back unfinished: no final event, its lease lapsed, its partial output kept
    # for the process that resumes it.
    handed = await Run.objects.aget(id=run.id)
    assert handed.status == Run.Status.RUNNING and handed.lease_lapsed()
    assert handed.output_tokens >= 3  # how far the cut call got
    logged = [f.type for f in await event_log().after(run.id, 0)]
    assert logged[-1] == "token" and not {"run.completed", "run.cancelled"} & set(logged)
    assert model_calls == ["HumanMessage", "ToolMessage"]

    # Another reaper (this one, here) resumes it.
    assert await lifecycle.runs_reap(executor=get_executor()) == 1
    await wait_for_runs()

    events = await events_of(run.id)
    types = [e["type"] for e in events]
    # One stream: increasing seqs, the resumed part past the earlier one's ceiling.
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    resumed = events[types.index("run.resumed")]
    assert resumed["seq"] == lifecycle.SEQ_BLOCK + 1 and resumed["recoveries"] == 1
    assert types[0] == "run.started" and types[-1] == "run.completed"
    # The calculator ran once: the resumed run went on from the checkpoint after it, and
    # only the cut call was made again.
    assert types.count("tool.finished") == 1
    assert model_calls == ["HumanMessage", "ToolMessage", "ToolMessage"]
    final = events[-1]
    [answer] = final["messages"]
    assert "391" in answer["content"]
    stored = [m async for m in Message.objects.filter(run_id=run.id).order_by("id")]
    assert [m.role for m in stored] == ["user", "tool", "assistant"]
    assert stored[1].tool["result"] == "391" and stored[2].content == answer["content"]
    # Each call billed once: the calculator call, the cut call for what it streamed, its
    # re-run in full; nothing left held, and the run's totals are the ledger's.
    records = [r async for r in UsageRecord.objects.filter(run_id=run.id).order_by("created_at")]
    assert len(records) == 3 and len({r.span_id for r in records}) == 3
    assert [r.usage_estimated for r in records] == [False, True, False]
    assert 3 <= records[1].output_tokens < records[2].output_tokens
    assert not await BudgetReservation.objects.filter(run_id=run.id).aexists()
    done = await Run.objects.aget(id=run.id)
    assert done.status == Run.Status.COMPLETED and done.recoveries == 1
    assert done.output_tokens == sum(r.output_tokens for r in records)
    assert final["usage"]["output_tokens"] == done.output_tokens
    # One trace, the gap in it.
    trace = await Trace.objects.aget(run_id=run.id)
    assert trace.status == Trace.Status.OK
    gap = await Span.objects.aget(trace_id=run.id, name="interrupted")
    assert gap.attributes == {"recoveries": 1} and gap.parent_id == run.id
    assert await Span.objects.filter(trace_id=run.id, kind=Span.Kind.TOOL).acount() == 1
    assert trace.span_count == await Span.objects.filter(trace_id=run.id).acount()
    # Its tokens are the ledger's, the cut call's included (its span died with the
    # process that made it: written from the ledger).
    assert (trace.input_tokens, trace.output_tokens) == (done.input_tokens, done.output_tokens)
    assert trace.cost_usd == done.cost_usd
    cut = await Span.objects.aget(id=records[1].span_id)
    assert (cut.kind, cut.output_tokens) == (Span.Kind.LLM, records[1].output_tokens)

    def trace_page() -> str:
        client = Client()
        client.force_login(user)
        return client.get(f"/traces/{run.id}/").content.decode()

    page = await database_sync_to_async(trace_page)()
    assert "interrupted" in page and "calculator" in page


def recover(run_id: uuid.UUID, **lease):
    lease = {"lease_owner": "other-host:1:0", "lease_expires_at": timezone.now()} | lease
    return lifecycle.run_recover(run_id=run_id, lease=lease)


def test_of_two_reapers_exactly_one_recovers_a_run(make_user):
    conversation = services.conversation_create(owner=make_user())
    run = lapsed_run(conversation)
    lease = {"lease_owner": "web-2:77:1", "lease_expires_at": timezone.now() + timedelta(60)}

    claims = [recover(run.id, **lease), recover(run.id, **lease)]

    assert claims[0] == lifecycle.RecoveredRun(run_id=run.id, recoveries=1)
    assert claims[1] is None
    run.refresh_from_db()
    assert (run.status, run.recoveries, run.lease_owner) == (Run.Status.QUEUED, 1, "web-2:77:1")


def test_a_run_that_kills_its_process_every_time_is_given_up(make_user, settings):
    settings.AGENT_RUN_MAX_RECOVERIES = 2
    conversation = services.conversation_create(owner=make_user())
    run = lapsed_run(conversation)

    claims = [recover(run.id)]
    for _ in range(2):
        # Started again, and its process died again.
        Run.objects.filter(id=run.id).update(
            status=Run.Status.RUNNING, lease_expires_at=timezone.now() - timedelta(seconds=1)
        )
        claims.append(recover(run.id))

    assert [type(claim).__name__ for claim in claims] == [
        "RecoveredRun",
        "RecoveredRun",
        "ClosedRun",
    ]
    final = claims[-1].final
    assert final["type"] == "run.interrupted" and "stopped 3 times" in final["error"]["message"]
    run.refresh_from_db()
    assert (run.status, run.recoveries) == (Run.Status.INTERRUPTED, 2)


def test_a_recovered_run_starts_where_it_was_numbering_past_its_earlier_seqs(make_user):
    conversation = services.conversation_create(owner=make_user())
    fresh = Run.objects.create(
        conversation=conversation, model=MODEL, **lifecycle.run_queued_lease()
    )
    # Its writer had reserved a second block of seqs before its process died.
    crashed = lapsed_run(conversation, event_seq=2 * lifecycle.SEQ_BLOCK)
    conversation.messages.create(run=crashed, role="user", content="Hello")
    recover(crashed.id)

    first = lifecycle.run_start(run_id=fresh.id)
    again = lifecycle.run_start(run_id=crashed.id)

    assert first is not None and again is not None
    assert (first.resumed, first.seq, first.run.event_seq) == (False, 0, lifecycle.SEQ_BLOCK)
    assert (again.resumed, again.seq) == (True, 2 * lifecycle.SEQ_BLOCK)
    assert again.run.event_seq == 3 * lifecycle.SEQ_BLOCK
    assert again.run.started_at == crashed.started_at  # the run's start, not this one's
    assert again.user_message is not None and again.user_message.content == "Hello"


def test_a_stalled_earlier_execution_never_lowers_the_seqs_a_later_one_reserved(make_user):
    conversation = services.conversation_create(owner=make_user())
    # Recovered once: its second execution reserved up to the third block...
    run = lapsed_run(conversation, event_seq=3 * lifecycle.SEQ_BLOCK, recoveries=1)
    conversation.messages.create(run=run, role="user", content="Hello")
    # ... when its first, stalled past its lease and not stopped yet, crossed its own
    # first block and reserved the next.
    lifecycle.run_seq_reserve(run_id=run.id, seq=lifecycle.SEQ_BLOCK)
    recover(run.id)

    again = lifecycle.run_start(run_id=run.id)

    # Its events go on past every seq the second execution may have sent: a client that
    # saw those sees these.
    assert again is not None and again.seq == 3 * lifecycle.SEQ_BLOCK


def test_a_run_recovered_before_it_ever_started_starts_as_a_fresh_one(make_user):
    conversation = services.conversation_create(owner=make_user())
    # Created under a process's lease, which died before starting it.
    run = Run.objects.create(
        conversation=conversation,
        model=MODEL,
        lease_owner="dead-host:1:0",
        lease_expires_at=timezone.now() - timedelta(seconds=1),
    )
    recover(run.id)

    start = lifecycle.run_start(run_id=run.id)

    assert start is not None and (start.resumed, start.seq) == (False, 0)
    assert start.run.started_at is not None


@pytest.mark.usefixtures("prices")
async def test_a_recovered_run_whose_latest_checkpoint_is_an_earlier_runs_starts_afresh(
    make_user, model_calls, keeper_held_off
):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    await database_sync_to_async(services.run_create)(
        conversation=conversation, content="What is 2 * 3?"
    )
    await wait_for_runs()
    # The next run's process died before its first checkpoint.
    run = await database_sync_to_async(lapsed_run)(conversation)
    await conversation.messages.acreate(run=run, role="user", content="What is 17 * 23?")
    model_calls.clear()

    assert await lifecycle.runs_reap(executor=get_executor()) == 1
    await wait_for_runs()

    events = await events_of(run.id)
    assert events[0]["type"] == "run.resumed" and events[-1]["type"] == "run.completed"
    # Its own question answered in full (not the earlier run's finished checkpoint).
    assert model_calls == ["HumanMessage", "ToolMessage"]
    [tool] = [e for e in events if e["type"] == "tool.finished"]
    assert tool["result"] == "391" and "391" in events[-1]["messages"][0]["content"]


async def test_a_run_recovered_elsewhere_is_stopped_here_and_left_be(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(services.run_create)(
        conversation=conversation, content="Tell me about yourself"
    )
    async for frame in follow(run.id):  # under way once it has said something
        if frame is not None and frame.type == "token":
            break

    # This process stalled past its lease, and another one recovered the run.
    def taken_over() -> None:
        Run.objects.filter(id=run.id).update(lease_expires_at=timezone.now())
        lease = {"lease_expires_at": timezone.now() + timedelta(seconds=60)}
        assert isinstance(recover(run.id, **lease), lifecycle.RecoveredRun)

    await database_sync_to_async(taken_over)()
    await lifecycle.lease_keeper().tick()  # this process's next renewal finds it gone
    await wait_for_runs()

    # Stopped here without ending it: it is the other process's to resume and finish.
    logged = {f.type for f in await event_log().after(run.id, 0)}
    assert not logged & set(lifecycle.FINAL_EVENTS.values())
    run = await Run.objects.aget(id=run.id)
    assert (run.status, run.recoveries, run.lease_owner) == (Run.Status.QUEUED, 1, "other-host:1:0")
    assert run.finished_at is None


async def test_handing_back_runs_it_does_not_hold_does_nothing(make_user):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(lapsed_run)(conversation)

    await lifecycle.lease_keeper().hand_back([run.id])

    assert (await Run.objects.aget(id=run.id)).lease_owner == "dead-host:4242:0badf00d"


async def test_a_message_while_a_run_is_to_be_resumed_waits_for_it(make_user, keeper_held_off):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(lapsed_run)(conversation)
    await conversation.messages.acreate(run=run, role="user", content="What is 17 * 23?")

    # The agent is still answering: the run whose process died is resumed, not dropped.
    with pytest.raises(ApplicationError) as refused:
        await database_sync_to_async(services.run_create)(
            conversation=conversation, content="Hello?"
        )
    assert refused.value.code == "run_active"
    await lifecycle.runs_reap(executor=get_executor())
    await wait_for_runs()

    events = await events_of(run.id)
    assert events[-1]["type"] == "run.completed" and "391" in events[-1]["messages"][0]["content"]
    assert await Run.objects.filter(conversation=conversation).acount() == 1


async def test_a_run_this_process_executes_is_not_recovered_here_when_its_lease_lags(
    make_user, settings
):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(services.run_create)(
        conversation=conversation, content="Tell me about yourself"
    )
    async for frame in follow(run.id):
        if frame is not None and frame.type == "token":
            break
    # This process stalled past the lease of a run it is still executing.
    await Run.objects.filter(id=run.id).aupdate(lease_expires_at=timezone.now())

    # A socket joins the conversation: the run is not taken from under its own process.
    joined = await database_sync_to_async(services.conversation_join)(
        user=user, conversation_id=conversation.id
    )
    await wait_for_runs()

    assert joined.active_run is not None and joined.active_run.id == run.id
    types = [e["type"] for e in await events_of(run.id)]
    assert "run.resumed" not in types and types[-1] == "run.completed"
    assert (await Run.objects.aget(id=run.id)).recoveries == 0


async def test_the_keeper_resumes_a_run_as_its_lease_lapses_not_at_its_next_renewal(
    make_user, settings
):
    # Renewals 200 s apart: only the lapse itself can wake the keeper in time.
    settings.AGENT_RUN_LEASE_SECONDS = 600
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    # Its process renewed it a lease ago, less a moment, and died.
    run = await database_sync_to_async(lapsed_run)(
        conversation, lease_expires_at=timezone.now() + timedelta(seconds=0.5)
    )
    await conversation.messages.acreate(run=run, role="user", content="What is 17 * 23?")
    keeper = lifecycle.LeaseKeeper()
    keeper.ensure_started(get_executor())
    try:
        async with asyncio.timeout(30):  # bounded against a hang; far below a renewal
            events = await events_of(run.id)
    finally:
        keeper._task.cancel()
    await wait_for_runs()

    assert events[0]["type"] == "run.resumed" and events[-1]["type"] == "run.completed"
    assert (await Run.objects.aget(id=run.id)).recoveries == 1


@pytest.mark.usefixtures("prices")
async def test_a_user_who_stops_a_resumed_run_stops_it(make_user, settings, keeper_held_off):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(services.run_create)(
        conversation=conversation, content="Tell me about yourself"
    )
    await run_until(run, tokens_after_tool=0)
    await lifecycle.lease_keeper().hand_back([run.id])
    await lifecycle.runs_reap(executor=get_executor())
    async for frame in follow(run.id, lifecycle.SEQ_BLOCK):  # resumed, and answering again
        if frame is not None and frame.type == "token":
            break

    await database_sync_to_async(services.run_cancel)(conversation=conversation)
    await wait_for_runs()

    final = (await events_of(run.id))[-1]
    assert final["type"] == "run.cancelled" and final["error"]["code"] == "cancelled"
    stopped = await Run.objects.aget(id=run.id)
    assert (stopped.status, stopped.recoveries) == (Run.Status.CANCELLED, 1)
    assert not await BudgetReservation.objects.filter(run_id=run.id).aexists()
    assert await lifecycle.runs_reap(executor=get_executor()) == 0


@pytest.mark.usefixtures("prices")
async def test_a_run_that_had_reached_its_step_limit_is_resumed_as_limit_reached(
    make_user, settings, keeper_held_off
):
    settings.AGENT_MAX_STEPS = 1  # the calculator call is one step too many
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(services.run_create)(
        conversation=conversation, content="What is 17 * 23?"
    )
    await wait_for_runs()
    ended = await Run.objects.aget(id=run.id)
    assert ended.error_code == "max_steps"
    # Its process died after the graph's last checkpoint (the step limit's explanation),
    # before the run was finished: nothing of its end was recorded.
    await Message.objects.filter(run_id=run.id).exclude(role="user").adelete()
    await Trace.objects.filter(run_id=run.id).adelete()
    await Span.objects.filter(trace_id=run.id).adelete()
    await Run.objects.filter(id=run.id).aupdate(
        status=Run.Status.RUNNING,
        finished_at=None,
        error_code="",
        error_message="",
        lease_owner="dead-host:4242:0badf00d",
        lease_expires_at=timezone.now() - timedelta(seconds=1),
    )

    assert await lifecycle.runs_reap(executor=get_executor()) == 1
    await wait_for_runs()

    final = (await event_log().after(run.id, ended.event_seq))[-1].event()
    assert final["type"] == "run.limit_reached" and final["error"]["code"] == "max_steps"
    assert "AGENT_MAX_STEPS" in final["messages"][0]["content"]
    resumed = await Run.objects.aget(id=run.id)
    assert (resumed.status, resumed.recoveries) == (Run.Status.LIMIT_REACHED, 1)


@pytest.mark.usefixtures("prices")
async def test_a_run_resumed_past_its_time_limit_ends_at_it(
    make_user, settings, model_calls, keeper_held_off
):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    settings.AGENT_RUN_TIMEOUT = 60
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(services.run_create)(
        conversation=conversation, content="What is 17 * 23?"
    )
    await run_until(run, tokens_after_tool=3)
    await lifecycle.lease_keeper().hand_back([run.id], cause="test")
    # Its first start was longer ago than the limit (its processes kept dying): resuming
    # it gives it no more time.
    await Run.objects.filter(id=run.id).aupdate(started_at=timezone.now() - timedelta(seconds=61))

    assert await lifecycle.runs_reap(executor=get_executor()) == 1
    await wait_for_runs()

    events = await events_of(run.id)
    final = events[-1]
    assert [e["type"] for e in events[-2:]] == ["run.resumed", "run.limit_reached"]
    assert final["error"]["code"] == "run_timeout"
    assert "longer than 60 seconds (AGENT_RUN_TIMEOUT)" in final["error"]["message"]
    assert model_calls == ["HumanMessage", "ToolMessage"]  # none after resuming
    # What it did before is kept, as a run that times out keeps it.
    stored = [m async for m in Message.objects.filter(run_id=run.id).order_by("id")]
    assert [m.role for m in stored] == ["user", "tool"] and stored[1].tool["result"] == "391"
    ended = await Run.objects.aget(id=run.id)
    assert (ended.status, ended.recoveries) == (Run.Status.LIMIT_REACHED, 1)


async def test_a_process_that_stops_resumes_no_run_in_itself(make_user, monkeypatch):
    # A web instance shutting down (its host drains, handing its runs back): were its
    # keeper to recover them, it would start them in itself, to die with it a moment
    # later and be found by another instance only a lease after.
    keeper = lifecycle.LeaseKeeper()
    monkeypatch.setattr(lifecycle, "_keeper", keeper)
    keeper.ensure_started(get_executor())
    keeper._task.cancel()  # ticked by hand below
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    run = await database_sync_to_async(lapsed_run)(conversation)

    await RunHost().drain(seconds=0)
    await keeper.tick()

    left = await Run.objects.aget(id=run.id)
    assert (left.status, left.recoveries) == (Run.Status.RUNNING, 0) and left.lease_lapsed()
