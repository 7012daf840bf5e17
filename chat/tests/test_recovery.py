"""Runs recovered after their process died or handed them back: claimed by exactly one
reaper, resumed from their own checkpoint (no completed step run again) with their
answer whole and each call billed once, or closed as interrupted past their limit."""

import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from billing.models import BudgetReservation, UsageRecord
from billing.tests.conftest import prices  # noqa: F401 (a fixture)
from chat import lifecycle, services
from chat.agent import offline_model
from chat.agent.executor import get_executor
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
        status=Run.Status.RUNNING,
        started_at=timezone.now() - timedelta(seconds=30),
        lease_owner="dead-host:4242:0badf00d",
        lease_expires_at=timezone.now() - timedelta(seconds=1),
        event_seq=lifecycle.SEQ_BLOCK,
        **fields,
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
