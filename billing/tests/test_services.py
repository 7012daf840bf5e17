"""The ledger, written by real runs of the built-in model over the WebSocket."""

import logging
import threading
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.test import Client
from django.urls import reverse

from agentsite.errors import ApplicationError
from agentsite.formatting import format_usd
from billing.models import Account, Membership, ModelPrice, UsageRecord
from billing.pricing import cost_of, price_for_model
from billing.services import account_for_user, api_key_create
from chat import services
from chat.models import Conversation, Run
from conftest import open_socket, receive_until, wait_for_runs
from tracing.models import Span, Trace
from tracing.selectors import trace_list

pytestmark = pytest.mark.django_db(transaction=True)


async def run_message(user, content, until="run.completed", cancel_after_tokens=None):
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    await socket.send_json_to({"type": "message", "content": content})
    if cancel_after_tokens is not None:
        frames = []
        while sum(f["type"] == "token" for f in frames) < cancel_after_tokens:
            frames.append(await socket.receive_json_from(timeout=10))
        await socket.send_json_to({"type": "cancel"})
        frames += await receive_until(socket, until)
    else:
        frames = await receive_until(socket, until)
    await socket.disconnect()
    await wait_for_runs()
    run = await Run.objects.aget(conversation=conversation)
    return run, frames


def records_of(run):
    return list(UsageRecord.objects.filter(run_id=run.id).order_by("created_at", "id"))


async def test_every_ledger_row_names_the_api_key_that_started_its_run(make_user, prices):
    user = await database_sync_to_async(make_user)()
    account = await database_sync_to_async(account_for_user)(user_id=user.id)
    api_key, _ = await database_sync_to_async(api_key_create)(
        account=account, created_by=user, name="integration", scopes=["runs"]
    )
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    by_key = await database_sync_to_async(services.run_create)(
        conversation=conversation, content="What is 17 * 23?", api_key_id=api_key.id
    )
    await wait_for_runs()
    by_browser, _ = await run_message(user, "What is 17 * 23?")

    await by_key.arefresh_from_db()
    assert by_key.status == Run.Status.COMPLETED and by_key.api_key_id == api_key.id
    keyed = await database_sync_to_async(records_of)(by_key)
    assert len(keyed) == 2  # a tool call, then the answer: both calls name the key
    assert {(r.api_key_id, r.api_key_prefix) for r in keyed} == {(api_key.id, api_key.prefix)}
    assert by_browser.api_key_id is None
    browser_rows = await database_sync_to_async(records_of)(by_browser)
    assert len(browser_rows) == 2
    assert {(r.api_key_id, r.api_key_prefix) for r in browser_rows} == {(None, "")}

    # The ledger keeps naming the key after it is gone; the run forgets it.
    await api_key.adelete()
    await by_key.arefresh_from_db()
    assert by_key.api_key_id is None
    assert await UsageRecord.objects.filter(api_key_id=api_key.id).acount() == 2


async def test_a_run_records_one_priced_row_per_llm_call(make_user, prices):
    user = await database_sync_to_async(make_user)()
    run, frames = await run_message(user, "What is 17 * 23?")

    records = await database_sync_to_async(records_of)(run)
    llm_spans = [s async for s in Span.objects.filter(trace_id=run.id, kind="llm")]
    assert len(records) == len(llm_spans) == 2
    by_span = {s.id: s for s in llm_spans}
    price = await database_sync_to_async(price_for_model)(model="agentsite-offline-demo")
    account = await database_sync_to_async(account_for_user)(user_id=user.id)
    for record in records:
        span = by_span[record.span_id]  # the join key to the real LLM span
        assert record.account_id == account.id and record.user_id == user.id
        assert record.model == "agentsite-offline-demo" and not record.price_missing
        assert (record.input_tokens, record.output_tokens) == (
            span.input_tokens,
            span.output_tokens,
        )
        assert record.input_tokens > 0 and record.output_tokens > 0
        expected = cost_of(
            price=price,
            input_tokens=record.input_tokens,
            output_tokens=record.output_tokens,
            cached_tokens=record.cached_tokens,
        )
        assert record.cost_usd == expected == span.cost_usd > 0
    total = sum(r.cost_usd for r in records)
    assert sum(r.input_tokens for r in records) == run.input_tokens
    assert sum(r.output_tokens for r in records) == run.output_tokens
    assert run.cost_usd == total
    trace = await Trace.objects.aget(run_id=run.id)
    assert trace.cost_usd == total
    assert frames[-1]["cost_usd"] == str(total)
    # The trace list's min-cost filter now has costs to filter on.
    listed = database_sync_to_async(lambda cost: list(trace_list(user=user, min_cost_usd=cost)))
    assert [t.run_id for t in await listed(total)] == [run.id]
    assert await listed(total + Decimal("0.00000001")) == []
    # The history footer shows what the live one did.
    page = await database_sync_to_async(conversation_page)(user, run)
    assert f'{format_usd(total)}</span> · <span class="usage">' in page


def conversation_page(user, run):
    client = Client()
    client.force_login(user)
    return client.get(reverse("chat:conversation", args=[run.conversation_id])).content.decode()


async def test_an_unpriced_model_records_its_tokens_flagged_and_never_free(
    make_user, prices, settings, caplog
):
    settings.AGENT_MODEL = "offline"
    await ModelPrice.objects.filter(model="agentsite-offline-demo").adelete()
    user = await database_sync_to_async(make_user)()
    with caplog.at_level(logging.WARNING, logger="billing.budget"):
        run, frames = await run_message(user, "What is 17 * 23?")

    records = await database_sync_to_async(records_of)(run)
    assert len(records) == 2
    assert all(r.price_missing and r.cost_usd is None for r in records)
    assert sum(r.input_tokens + r.output_tokens for r in records) == run.total_tokens > 0
    assert run.cost_usd is None
    assert (await Trace.objects.aget(run_id=run.id)).cost_usd is None
    assert frames[-1]["cost_usd"] is None
    assert "no price for model 'agentsite-offline-demo'" in caplog.text
    page = await database_sync_to_async(conversation_page)(user, run)
    assert '<span class="cost">price unknown</span>' in page


async def test_without_tracing_each_call_is_still_recorded(make_user, prices, settings):
    settings.TRACING_ENABLED = False
    user = await database_sync_to_async(make_user)()
    run, frames = await run_message(user, "What is 17 * 23?")

    assert not await Trace.objects.filter(run_id=run.id).aexists()
    records = await database_sync_to_async(records_of)(run)
    assert len(records) == 2 and all(r.span_id is not None for r in records)
    assert sum(r.input_tokens for r in records) == run.input_tokens > 0
    assert sum(r.output_tokens for r in records) == run.output_tokens > 0
    assert sum(r.cost_usd for r in records) == run.cost_usd > 0
    assert frames[-1]["cost_usd"] == str(run.cost_usd)


async def test_a_cancelled_run_records_what_it_used(make_user, prices, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    run, frames = await run_message(
        user, "Tell me about yourself", until="run.cancelled", cancel_after_tokens=3
    )

    assert run.status == Run.Status.CANCELLED and run.output_tokens > 0
    records = await database_sync_to_async(records_of)(run)
    assert records and all(r.span_id is not None for r in records)
    # The interrupted call is billed what the user saw stream, against its own span.
    assert sum(r.output_tokens for r in records) == run.output_tokens
    assert sum(r.input_tokens for r in records) == run.input_tokens
    total = sum(r.cost_usd for r in records)
    assert total > 0 and run.cost_usd == total
    assert frames[-1]["cost_usd"] == str(total)
    spans = {s.id: s async for s in Span.objects.filter(trace_id=run.id, kind="llm")}
    assert all(spans[r.span_id].cost_usd == r.cost_usd for r in records)
    assert (await Trace.objects.aget(run_id=run.id)).cost_usd == total


def test_account_for_user_creates_one_personal_account(make_user):
    user = make_user()
    account = account_for_user(user_id=user.id)
    assert account_for_user(user_id=user.id) == account
    assert Account.objects.count() == 1
    membership = Membership.objects.get(user=user)
    assert membership.role == "owner" and membership.account.name == user.username


def test_concurrent_first_requests_end_up_with_one_account(make_user):
    user = make_user()
    start = threading.Barrier(16)
    accounts: list[int] = []

    def first_request() -> None:
        start.wait()
        try:
            accounts.append(account_for_user(user_id=user.id).id)
        finally:
            connection.close()

    threads = [threading.Thread(target=first_request) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(accounts) == 16 and len(set(accounts)) == 1
    assert Account.objects.count() == 1  # the losers' inserts were rolled back
    assert Membership.objects.filter(user=user).count() == 1


async def test_the_ledger_survives_deleting_the_conversation(make_user, prices):
    user = await database_sync_to_async(make_user)()
    run, _ = await run_message(user, "Hello")
    assert run.cost_usd > 0

    conversation = await Conversation.objects.aget(id=run.conversation_id)
    await database_sync_to_async(services.conversation_delete)(conversation=conversation)

    assert not await Run.objects.filter(id=run.id).aexists()
    records = await database_sync_to_async(records_of)(run)
    assert sum(r.cost_usd for r in records) == run.cost_usd


async def test_an_account_created_in_a_refused_request_is_not_remembered(make_user, prices):
    user = await database_sync_to_async(make_user)()
    # A new user's first request creates their account, in the transaction that starts a
    # conversation and its run; the message is refused, and all of it is rolled back.
    with pytest.raises(ApplicationError):
        await database_sync_to_async(services.conversation_start)(
            owner=user, source=Conversation.Source.API, content="   "
        )
    assert not await Account.objects.aexists()

    # The next message is answered, from an account of the user's own.
    run, frames = await run_message(user, "What is 17 * 23?")

    assert frames[-1]["type"] == "run.completed" and "391" in frames[-1]["messages"][0]["content"]
    account = await Account.objects.aget(memberships__user=user)
    assert await UsageRecord.objects.filter(run_id=run.id, account=account).aexists()
