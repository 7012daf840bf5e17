"""Executing runs: one graph, compiled once, serves every run; what a run brings (its
ids, its account's budget) travels with the run, never in the shared graph."""

import asyncio

import pytest
from channels.db import database_sync_to_async

from billing.models import BudgetReservation, UsageRecord
from billing.services import account_for_user
from chat import services
from chat.agent import graph
from chat.events import follow
from chat.models import Conversation, Message, Run
from conftest import account_with_limits, wait_for_runs

pytestmark = pytest.mark.django_db(transaction=True)


async def start_run(user, content: str) -> Run:
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    return await database_sync_to_async(services.run_create)(
        conversation=conversation, content=content
    )


async def test_every_run_is_served_by_the_graph_compiled_once(make_user, monkeypatch):
    compiled = []
    build = graph.build_graph
    monkeypatch.setattr(
        graph, "build_graph", lambda *args, **kw: compiled.append(1) or build(*args, **kw)
    )
    graph._compiled.cache_clear()
    user = await database_sync_to_async(make_user)()

    runs = [await start_run(user, f"What is {n} * 3?") for n in (2, 4)]
    await asyncio.wait_for(wait_for_runs(), timeout=30)

    for run, product in zip(runs, ("6", "12"), strict=True):
        await run.arefresh_from_db()
        assert run.status == Run.Status.COMPLETED
        tool = await Message.objects.aget(run=run, role=Message.Role.TOOL)
        assert tool.tool["result"] == product
    assert len(compiled) == 1


async def test_runs_at_once_each_spend_from_their_own_budget(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.02  # slow enough that the runs overlap
    alice, bob, carol = [
        await database_sync_to_async(make_user)(name) for name in ("alice", "bob", "carol")
    ]
    for user in (alice, bob):
        await database_sync_to_async(account_with_limits)(user)
    # Carol's account cannot pay for a single call.
    await database_sync_to_async(account_with_limits)(carol, tokens_per_day=1)

    runs = await asyncio.gather(
        start_run(alice, "What is 17 * 23?"),
        start_run(bob, "What is 19 * 21?"),
        start_run(carol, "What is 2 * 3?"),
    )
    await asyncio.wait_for(wait_for_runs(), timeout=60)

    statuses = []
    for run, user in zip(runs, (alice, bob, carol), strict=True):
        await run.arefresh_from_db()
        statuses.append(run.status)
        account = await database_sync_to_async(account_for_user)(user_id=user.pk)
        rows = [r async for r in UsageRecord.objects.filter(run_id=run.id)]
        # Every call of a run is billed to its own account and user, at what it used.
        assert all((r.account_id, r.user_id) == (account.pk, user.pk) for r in rows)
        assert sum(r.input_tokens + r.output_tokens for r in rows) == run.total_tokens
        assert not await BudgetReservation.objects.filter(run_id=run.id).aexists()
    assert statuses == [Run.Status.COMPLETED, Run.Status.COMPLETED, Run.Status.BUDGET_EXCEEDED]
    assert [await UsageRecord.objects.filter(run_id=run.id).acount() for run in runs] == [2, 2, 0]


def checkpoints_of(thread_id: str) -> int:
    from django.conf import settings as django_settings
    from langgraph.checkpoint.sqlite import SqliteSaver

    with SqliteSaver.from_conn_string(str(django_settings.AGENT_CHECKPOINT_SQLITE_PATH)) as saver:
        return len(list(saver.list({"configurable": {"thread_id": thread_id}})))


async def test_a_run_deleted_with_its_conversation_leaves_no_agent_memory(make_user, settings):
    # A conversation deleted in the database (a cascade, an operator's cleanup), runs
    # and all, without its run in flight being stopped: what that run checkpoints
    # afterwards would be memory of a conversation that no longer exists.
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    run = await start_run(user, "Tell me a long story.")
    thread = str(run.conversation_id)
    async for frame in follow(run.id):  # under way once it has said something
        if frame is not None and frame.type == "token":
            break

    await Conversation.objects.filter(id=run.conversation_id).adelete()
    await asyncio.wait_for(wait_for_runs(), timeout=60)

    assert not await Run.objects.filter(id=run.id).aexists()
    assert await database_sync_to_async(checkpoints_of)(thread) == 0


async def test_a_user_deleted_mid_run_still_leaves_its_spend_in_the_ledger(make_user, settings):
    # Deleting a user in the admin deletes their runs, not the account's money: the call
    # the run was making is recorded all the same, naming no user.
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    account = await database_sync_to_async(account_for_user)(user_id=user.id)
    run = await start_run(user, "What is 17 * 23?")
    async for frame in follow(run.id):
        if frame is not None and frame.type == "token":
            break

    await user.adelete()
    await asyncio.wait_for(wait_for_runs(), timeout=60)

    calls = [record async for record in UsageRecord.objects.filter(run_id=run.id)]
    assert len(calls) == 2  # the calculator call, and the answer cut short
    assert {record.user_id for record in calls} == {None}
    assert {record.account_id for record in calls} == {account.id}
    assert not await BudgetReservation.objects.filter(run_id=run.id).aexists()
