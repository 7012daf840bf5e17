"""Budgets hold: real runs of the built-in model over the WebSocket, against an account's
limits. Each call reserves its worst case first; a run whose next step would pass a
limit stops with `budget_exceeded`, and what it spent is in the ledger."""

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async
from django.db.models import Sum
from django.utils import timezone

from billing.budget import (
    CONCURRENT_RUNS_RETRY_AFTER,
    BudgetExceeded,
    Usage,
    budget_release_stale,
    budget_reserve,
    budget_settle,
)
from billing.models import Account, BudgetReservation, DailySpend, UsageRecord
from billing.pricing import cost_of, price_for_model
from billing.tests.test_services import records_of, run_message
from chat import services
from chat.models import Message, Run
from conftest import account_with_limits, open_socket, receive_until, wait_for_runs

pytestmark = pytest.mark.django_db(transaction=True)

CENT_FRACTION = Decimal("0.00000001")


def assert_counters_match_ledger(account: Account) -> None:
    counters = DailySpend.objects.filter(account=account).aggregate(
        spent=Sum("spent_usd"), reserved=Sum("reserved_usd"), tokens=Sum("tokens_reserved")
    )
    ledger = UsageRecord.objects.filter(account=account).aggregate(total=Sum("cost_usd"))
    assert Decimal(counters["spent"] or 0).quantize(CENT_FRACTION) == (ledger["total"] or 0)
    assert Decimal(counters["reserved"] or 0).quantize(CENT_FRACTION) == 0
    assert (counters["tokens"] or 0) == 0
    assert not BudgetReservation.objects.filter(account=account).exists()


async def calibrate(make_user, content: str) -> list[UsageRecord]:
    """The ledger rows of one unlimited run of `content`: each call's cost and the worst
    case it reserved (the same message always costs and reserves the same)."""
    user = await database_sync_to_async(make_user)(f"calibration-{uuid.uuid4().hex[:8]}")
    await database_sync_to_async(account_with_limits)(user)
    run, _ = await run_message(user, content)
    return await database_sync_to_async(records_of)(run)


async def test_a_run_that_cannot_afford_its_first_call_makes_none(make_user, prices):
    user = await database_sync_to_async(make_user)()
    account = await database_sync_to_async(account_with_limits)(
        user, money_per_day_usd=Decimal("0.0001")
    )

    run, frames = await run_message(user, "Hello there", until="run.budget_exceeded")

    assert run.status == Run.Status.BUDGET_EXCEEDED and run.steps == 0
    error = frames[-1]["error"]
    assert error["code"] == run.error_code == "budget_exceeded"
    assert "daily budget of $0.0001 is used up" in error["message"]
    assert "raise it in the admin" in error["message"]
    assert not await UsageRecord.objects.filter(run_id=run.id).aexists()
    assert frames[-1]["cost_usd"] == "0"
    await database_sync_to_async(assert_counters_match_ledger)(account)


@pytest.mark.parametrize(
    ("limit", "says"),
    [
        ("money_per_day_usd", "daily budget of $"),
        ("money_per_month_usd", "monthly budget of $"),
        ("money_per_run_usd", "per run"),
    ],
)
async def test_a_run_stops_where_its_next_step_would_pass_a_limit(
    make_user, prices, settings, limit, says
):
    # No room to lower a call's output cap: each call needs its full worst case.
    settings.AGENT_MIN_OUTPUT_TOKENS = settings.AGENT_MAX_TOKENS
    first_call, _ = await calibrate(make_user, "What is 17 * 23?")
    user = await database_sync_to_async(make_user)()
    # Exactly the first call's worst case: the first call fits, the second (a longer
    # prompt, after what the first spent) cannot.
    account = await database_sync_to_async(account_with_limits)(
        user, **{limit: first_call.reserved_usd}
    )

    run, frames = await run_message(user, "What is 17 * 23?", until="run.budget_exceeded")

    assert run.status == Run.Status.BUDGET_EXCEEDED and run.steps == 1
    assert says in run.error_message
    [record] = await database_sync_to_async(records_of)(run)
    assert record.cost_usd == first_call.cost_usd == run.cost_usd
    assert frames[-1]["cost_usd"] == str(first_call.cost_usd)
    # What it did before the limit is kept: the tool step and its result.
    tool = await Message.objects.aget(run=run, role=Message.Role.TOOL)
    assert tool.tool["result"] == "391"
    await database_sync_to_async(assert_counters_match_ledger)(account)

    # Raised by an operator, the same conversation goes on: its history is valid.
    account.plan, account.money_per_day_usd = None, None
    account.money_per_month_usd, account.money_per_run_usd = None, None
    await account.asave()
    socket = await open_socket(f"/ws/chat/{run.conversation_id}/", user)
    await socket.receive_json_from()
    await socket.send_json_to({"type": "message", "content": "Thanks"})
    assert (await receive_until(socket, "run.completed"))[-1]["status"] == "completed"
    await socket.disconnect()
    await wait_for_runs()


async def test_the_tokens_per_day_limit_is_enforced(make_user, prices):
    user = await database_sync_to_async(make_user)()
    await database_sync_to_async(account_with_limits)(user, tokens_per_day=100)

    run, _ = await run_message(user, "Hello there", until="run.budget_exceeded")

    assert "limit of 100 tokens per day is used up" in run.error_message


async def test_one_after_another_runs_stop_where_the_arithmetic_says(make_user, prices, settings):
    [call] = await calibrate(make_user, "Hello there")
    cost, worst = call.cost_usd, call.reserved_usd
    assert cost < worst
    # The floor above the answer's length: every admitted run is answered in full.
    settings.AGENT_MIN_OUTPUT_TOKENS = call.output_tokens + 10
    price = await database_sync_to_async(price_for_model)(model=call.model)
    unused = settings.AGENT_MAX_TOKENS - settings.AGENT_MIN_OUTPUT_TOKENS
    # The call's prompt and the floor's output: the least a run needs to be admitted.
    least = worst - cost_of(price=price, input_tokens=0, output_tokens=unused)
    user = await database_sync_to_async(make_user)()
    # A run is admitted while spent + the least it needs fits: 1 + floor((budget -
    # least) / cost) runs, here 3; a run refused with money left is a false refusal.
    budget = least + cost * Decimal("2.5")
    account = await database_sync_to_async(account_with_limits)(user, money_per_day_usd=budget)
    other = await database_sync_to_async(make_user)("bob")
    other_account = await database_sync_to_async(account_with_limits)(other)

    statuses = []
    for _ in range(5):
        conversation = await database_sync_to_async(services.conversation_create)(owner=user)
        await database_sync_to_async(services.run_create)(
            conversation=conversation, content="Hello there"
        )
        await wait_for_runs()
        statuses.append((await Run.objects.aget(conversation=conversation)).status)
    # Another account is untouched by this one's spending, and spends its own.
    other_run, _ = await run_message(other, "Hello there")

    assert statuses == ["completed"] * 3 + ["budget_exceeded"] * 2
    spent = (await account.usage.aaggregate(total=Sum("cost_usd")))["total"]
    assert spent == 3 * cost <= budget
    assert other_run.status == Run.Status.COMPLETED
    assert [r.account_id async for r in UsageRecord.objects.filter(run_id=other_run.id)] == [
        other_account.id
    ]
    for each in (account, other_account):
        await database_sync_to_async(assert_counters_match_ledger)(each)


async def test_a_cancelled_call_is_billed_its_prompt_and_what_it_streamed(
    make_user, prices, settings
):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    account = await database_sync_to_async(account_with_limits)(user, money_per_day_usd=Decimal(1))

    run, frames = await run_message(
        user, "Tell me about yourself", until="run.cancelled", cancel_after_tokens=3
    )

    [record] = await database_sync_to_async(records_of)(run)
    # The provider had the prompt and streamed some output: both are billed, no more.
    assert record.input_tokens == run.input_tokens > 0
    assert 3 <= record.output_tokens == run.output_tokens
    assert record.cost_usd == run.cost_usd < record.reserved_usd
    assert frames[-1]["usage"]["total_tokens"] == run.total_tokens
    await database_sync_to_async(assert_counters_match_ledger)(account)


def test_a_crashed_runs_reservation_is_settled_with_it(make_user, prices):
    user = make_user()
    account = account_with_limits(user, money_per_day_usd=Decimal("0.01"))
    conversation = services.conversation_create(owner=user)
    # Its process died mid-call, after its last lease renewal recorded 7 streamed tokens,
    # and it had been resumed as often as a run may be (else it is resumed again).
    crashed = Run.objects.create(
        conversation=conversation,
        model="agentsite-offline-demo",
        status=Run.Status.RUNNING,
        lease_expires_at=timezone.now() - timedelta(seconds=1),
        output_tokens=7,
        recoveries=3,
    )
    budget_reserve(
        account_id=account.id,
        user_id=user.id,
        run_id=crashed.id,
        call_id=uuid.uuid4(),
        model="agentsite-offline-demo",
        prompt_tokens=1000,
        max_output_tokens=1024,
    )
    assert DailySpend.objects.get(account=account).reserved_usd > 0

    # The next message finds the run's lease lapsed: the run closes, its hold is settled
    # for the prompt and what it streamed, as a cancelled call's is.
    services.run_create(conversation=conversation, content="Hello")

    crashed.refresh_from_db()
    assert crashed.status == Run.Status.INTERRUPTED
    assert crashed.error_code == "run_interrupted"
    [record] = UsageRecord.objects.filter(run_id=crashed.id)
    assert (record.input_tokens, record.output_tokens) == (1000, 7)
    assert crashed.cost_usd == record.cost_usd > 0
    assert_counters_match_ledger(account)


async def test_the_concurrent_runs_limit_refuses_one_more(make_user, prices, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    await database_sync_to_async(account_with_limits)(user, concurrent_runs=1)
    first, second = [
        await database_sync_to_async(services.conversation_create)(owner=user) for _ in "ab"
    ]
    busy = await open_socket(f"/ws/chat/{first.id}/", user)
    await busy.receive_json_from()
    await busy.send_json_to({"type": "message", "content": "Tell me about yourself"})
    await receive_until(busy, "token")
    other = await open_socket(f"/ws/chat/{second.id}/", user)
    await other.receive_json_from()

    await other.send_json_to({"type": "message", "content": "Hello"})
    refused = await other.receive_json_from()

    assert refused["type"] == "error" and refused["code"] == "concurrent_runs_limit"
    assert "may have 1 answer in progress at once" in refused["message"]
    assert refused["retry_after"] == CONCURRENT_RUNS_RETRY_AFTER
    await receive_until(busy, "run.completed")
    await wait_for_runs()
    # Once the first is done the socket works again.
    await other.send_json_to({"type": "message", "content": "Hello"})
    assert (await receive_until(other, "run.completed"))[-1]["status"] == "completed"
    for socket in (busy, other):
        await socket.disconnect()
    await wait_for_runs()


def reserve_for(user, account, run_id, model="agentsite-offline-demo", **options):
    return budget_reserve(
        account_id=account.id,
        user_id=user.id,
        run_id=run_id,
        call_id=uuid.uuid4(),
        model=model,
        prompt_tokens=1000,
        max_output_tokens=1024,
        **options,
    )


def test_a_call_finishing_after_its_hold_was_released_is_still_recorded(make_user, prices):
    user = make_user()
    account = account_with_limits(user, money_per_day_usd=Decimal(1))
    reservation = reserve_for(user, account, uuid.uuid4())
    # Its run was given up for dead while the call still ran.
    assert budget_release_stale(account_id=account.id, active_run_ids=[]) == 1

    assert budget_settle(reservation=reservation, usage=Usage(1000, 50))
    assert not budget_settle(reservation=reservation, usage=Usage(1000, 50))  # once only

    [record] = UsageRecord.objects.filter(account=account)
    assert (record.input_tokens, record.output_tokens) == (1000, 50) and record.cost_usd > 0
    assert_counters_match_ledger(account)


def test_holds_of_runs_that_are_over_are_freed_before_the_next_run(make_user, prices):
    user = make_user()
    account = account_with_limits(user, money_per_day_usd=Decimal(1))
    conversation = services.conversation_create(owner=user)
    # A run that finished without settling its hold (its finish failed to record).
    finished = Run.objects.create(
        conversation=conversation, model="agentsite-offline-demo", status=Run.Status.COMPLETED
    )
    reserve_for(user, account, finished.id)
    other = services.conversation_create(owner=user)

    services.run_create(conversation=other, content="Hello")

    assert_counters_match_ledger(account)


def test_an_unpriced_model_cannot_spend_under_a_money_limit(make_user, prices):
    user = make_user()
    account = account_with_limits(user, money_per_day_usd=Decimal(1))

    with pytest.raises(BudgetExceeded) as refused:
        reserve_for(user, account, uuid.uuid4(), model="no-such-model")

    assert "'no-such-model' has no price" in refused.value.message
    assert "add its price in the admin" in refused.value.message
    # Without money limits it is recorded unpriced instead (test_services).
    account.money_per_day_usd = None
    account.save()
    reserve_for(user, account, uuid.uuid4(), model="no-such-model")


def test_a_call_is_granted_the_output_the_limits_leave(make_user, prices):
    user = make_user()
    price = price_for_model(model="agentsite-offline-demo")
    assert price is not None
    # Room for the prompt and 300 tokens of output, not the 1,024 asked for.
    limit = cost_of(price=price, input_tokens=1000, output_tokens=300)
    account = account_with_limits(user, money_per_day_usd=limit)

    granted = reserve_for(user, account, uuid.uuid4())

    assert granted.output_tokens == 300 and granted.prompt_tokens == 1000
    assert granted.amount_usd == limit
    # With that held, not even a short answer fits any more.
    with pytest.raises(BudgetExceeded) as refused:
        reserve_for(user, account, uuid.uuid4(), min_output_tokens=64)
    assert "daily budget of $" in refused.value.message
    assert "even a short next step would cost" in refused.value.message


def test_the_output_cap_never_drops_below_the_floor(make_user, prices):
    user = make_user()
    price = price_for_model(model="agentsite-offline-demo")
    assert price is not None
    account = account_with_limits(
        user, money_per_run_usd=cost_of(price=price, input_tokens=1000, output_tokens=63)
    )

    with pytest.raises(BudgetExceeded) as refused:
        reserve_for(user, account, uuid.uuid4(), min_output_tokens=64)
    assert "per run" in refused.value.message
    assert not BudgetReservation.objects.filter(account=account).exists()


def test_the_tokens_per_day_limit_lowers_the_output_cap_too(make_user, prices):
    user = make_user()
    account = account_with_limits(user, tokens_per_day=1200)

    assert reserve_for(user, account, uuid.uuid4()).output_tokens == 200


async def test_a_budget_worth_ten_runs_pays_for_about_ten_runs(make_user, prices, settings):
    """The finding of issue 8: each call held AGENT_MAX_TOKENS of output at the model's
    price, so a limit worth 10 real runs (less than one worst case) admitted none."""
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0
    [call] = await calibrate(make_user, "Hello there")
    budget = call.cost_usd * 10
    assert call.reserved_usd > budget  # so every run was refused before
    user = await database_sync_to_async(make_user)()
    account = await database_sync_to_async(account_with_limits)(user, money_per_day_usd=budget)

    statuses = []
    for _ in range(30):
        conversation = await database_sync_to_async(services.conversation_create)(owner=user)
        await database_sync_to_async(services.run_create)(
            conversation=conversation, content="Hello there"
        )
        await wait_for_runs()
        statuses.append((await Run.objects.aget(conversation=conversation)).status)

    spent = (await account.usage.aaggregate(total=Sum("cost_usd")))["total"]
    assert spent <= budget
    # What the arithmetic allows is 10 runs; the last needs room for a short answer.
    assert spent >= budget * Decimal("0.8"), (spent, budget, statuses)
    assert statuses.count(Run.Status.COMPLETED) >= 8
    await database_sync_to_async(assert_counters_match_ledger)(account)


def test_a_call_settled_with_the_next_reserve_stays_settled_when_that_is_refused(make_user, prices):
    user = make_user()
    run_id = uuid.uuid4()
    first = reserve_for(user, account_with_limits(user), run_id)
    # The first call spent nearly all the day allows: the next cannot afford a short one.
    price = price_for_model(model="agentsite-offline-demo")
    assert price is not None
    cost = cost_of(price=price, input_tokens=1000, output_tokens=1000)
    account = account_with_limits(user, money_per_day_usd=cost + Decimal("0.000001"))

    with pytest.raises(BudgetExceeded):
        reserve_for(user, account, run_id, settle_first=(first, Usage(1000, 1000)))

    [record] = UsageRecord.objects.filter(account=account)
    assert (record.span_id, record.cost_usd) == (first.id, cost)
    assert not record.usage_estimated
    assert_counters_match_ledger(account)
