"""A burst of runs from several processes at once against one account's daily budget:
the scaled-out deployment, where N instances share one database and only its locking
keeps them from overspending. test_budget_burst.py runs it on SQLite and PostgreSQL.

    DATABASE_URL=… python -m billing.tests.budget_burst [--runs 200] [--processes 4]

The parent migrates a fresh database, measures one run of the built-in model (its cost
and its reserved worst case), sets the budget, and starts the child processes, which
all start their share of the runs at the same moment (the burst). Then it starts them
again, each sending one run after another until one is refused (the users who were
refused, trying again once the burst is over): what the burst held and did not spend
must be spendable, down to the last short answer. It prints one JSON object.
Settings come from the environment (DATABASE_URL, AGENT_OFFLINE_TOKEN_DELAY, …) like
a deployment's; the caller sets them.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

PROMPT = "Hello there"


def setup() -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "agentsite.settings"
    import django

    django.setup()


def least_cost(reserved: Decimal) -> Decimal:
    """What the calibration call needs at least to be admitted: its worst case with the
    output cap lowered from AGENT_MAX_TOKENS to AGENT_MIN_OUTPUT_TOKENS."""
    from django.conf import settings

    from billing.pricing import cost_of, price_for_model
    from chat.agent.offline_model import OFFLINE_MODEL_NAME

    price = price_for_model(model=OFFLINE_MODEL_NAME)
    assert price is not None
    unused = settings.AGENT_MAX_TOKENS - settings.AGENT_MIN_OUTPUT_TOKENS
    return reserved - cost_of(price=price, input_tokens=0, output_tokens=unused)


async def start_runs(username: str, count: int) -> list[str]:
    """Start `count` runs of `username` at once (one conversation each) and wait for them."""
    from channels.db import database_sync_to_async
    from django.contrib.auth import get_user_model

    from chat import services
    from conftest import wait_for_runs

    user = await get_user_model().objects.aget(username=username)

    def start() -> str:
        conversation = services.conversation_create(owner=user)
        return str(services.run_create(conversation=conversation, content=PROMPT).id)

    run_ids = await asyncio.gather(*(database_sync_to_async(start)() for _ in range(count)))
    await wait_for_runs()
    return list(run_ids)


def calibrate() -> tuple[Decimal, Decimal]:
    """One run on an unlimited account: what a run costs and what its call reserves."""
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from billing.models import UsageRecord
    from billing.services import account_for_user

    settings.AGENT_OFFLINE_TOKEN_DELAY = 0  # same tokens, same cost, no waiting
    user = get_user_model().objects.create_user("calibration")
    account = account_for_user(user_id=user.pk)
    account.plan = None
    account.save()
    [run_id] = asyncio.run(start_runs("calibration", 1))
    [record] = UsageRecord.objects.filter(run_id=run_id)
    assert record.cost_usd is not None and record.reserved_usd is not None
    return record.cost_usd, record.reserved_usd


def race(threads: int = 8, attempts: int = 6, fits: int = 10) -> int:
    """`threads` threads reserve at once, straight through the service, against a daily
    budget of exactly `fits` worst cases; returns how many reservations were admitted."""
    import threading
    import uuid

    from django.contrib.auth import get_user_model
    from django.db import connection

    from billing.budget import BudgetExceeded, budget_release_stale, budget_reserve
    from billing.services import account_for_user

    user = get_user_model().objects.create_user("race")
    account = account_for_user(user_id=user.pk)
    account.plan = None
    account.save()
    run_id = uuid.uuid4()

    def reserve() -> None:
        budget_reserve(
            account_id=account.pk,
            user_id=user.pk,
            run_id=run_id,
            call_id=uuid.uuid4(),
            model="gpt-4.1-mini",
            prompt_tokens=1000,
            max_output_tokens=1000,
        )

    reserve()
    worst_case = account.reservations.get().amount_usd
    budget_release_stale(account_id=account.pk, active_run_ids=[])  # no run: a stale hold
    account.money_per_day_usd = worst_case * fits
    account.save()
    admitted: list[int] = []
    start = threading.Barrier(threads)

    def attempt() -> None:
        start.wait()
        try:
            for _ in range(attempts):
                try:
                    reserve()
                    admitted.append(1)
                except BudgetExceeded:
                    pass
        finally:
            connection.close()

    workers = [threading.Thread(target=attempt) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return len(admitted)


def parent(args: argparse.Namespace) -> dict[str, Any]:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db.models import Count, Max, Min, Sum

    from billing.models import BudgetReservation, DailySpend, UsageRecord
    from billing.services import account_for_user
    from chat.models import Run
    from tracing.models import Span

    call_command("migrate", verbosity=0)
    cost, reserved = calibrate()
    budget = (reserved * args.budget_in_worst_cases).quantize(Decimal("0.0001"))
    user = get_user_model().objects.create_user("burst")
    account = account_for_user(user_id=user.pk)
    account.plan = None  # no limit but the one under test
    account.money_per_day_usd = budget
    account.save()

    start_at = time.time() + 3  # time for the children to import and set up
    command = [sys.executable, "-m", "billing.tests.budget_burst", "--start-at", str(start_at)]
    children = [
        subprocess.Popen([*command, "--child", str(args.runs // args.processes)])
        for _ in range(args.processes)
    ]
    if any(child.wait() for child in children):
        raise SystemExit("a child process failed")

    runs = Run.objects.filter(conversation__owner=user)
    statuses = dict(runs.values_list("status").annotate(n=Count("id")))
    burst_runs = runs.count()
    refused = runs.filter(status=Run.Status.BUDGET_EXCEEDED)
    ledger = UsageRecord.objects.filter(account=account)
    burst_spent = ledger.aggregate(total=Sum("cost_usd"))["total"] or 0
    last_start = runs.aggregate(at=Max("started_at"))["at"].timestamp()
    first_settle = ledger.aggregate(at=Min("created_at"))["at"].timestamp()
    # When the last run of the burst asked for its reservation: a refused run was
    # refused then and finished at once; an admitted one's call started right after
    # (its LLM span). Not its start: a run starts (is created) well before it reserves,
    # and under load a run that started before the first settle could reserve after it.
    last_refusal = refused.aggregate(at=Max("finished_at"))["at"]
    last_call = Span.objects.filter(trace__run__in=runs, kind=Span.Kind.LLM).aggregate(
        at=Max("started_at")
    )["at"]
    last_reserve = max(at for at in (last_refusal, last_call) if at is not None).timestamp()
    burst_checks = {
        # What made runs fail, if any did (none should).
        "failures": sorted(
            set(runs.filter(status=Run.Status.FAILED).values_list("error_code", "error_message"))
        ),
        "refused_messages_name_the_daily_budget": not refused.exclude(
            error_message__contains="daily budget of $"
        ).exists(),
        "refused_before_any_call": not refused.exclude(steps=0).exists(),
    }

    after_started = time.time()
    command = [sys.executable, "-m", "billing.tests.budget_burst", "--until-refused"]
    retries = [subprocess.Popen(command) for _ in range(args.processes)]
    if any(child.wait() for child in retries):
        raise SystemExit("a child process failed")
    after_seconds = round(time.time() - after_started, 1)
    counters = DailySpend.objects.filter(account=account).aggregate(
        spent=Sum("spent_usd"), reserved=Sum("reserved_usd")
    )
    return {
        "runs": burst_runs,
        "statuses": statuses,
        "budget_usd": str(budget),
        "run_cost_usd": str(cost),
        "call_reserved_usd": str(reserved),
        "call_least_usd": str(least_cost(reserved)),
        "burst_spent_usd": str(burst_spent),
        "runs_after_the_burst": runs.count() - burst_runs,
        "statuses_after_the_burst": dict(
            runs.filter(started_at__gt=datetime.fromtimestamp(last_start, UTC))
            .values_list("status")
            .annotate(n=Count("id"))
        ),
        "seconds_after_the_burst": after_seconds,
        "ledger_spent_usd": str(ledger.aggregate(total=Sum("cost_usd"))["total"] or 0),
        "counter_spent_usd": str(counters["spent"] or 0),
        "counter_reserved_usd": str(counters["reserved"] or 0),
        "reservations_left": BudgetReservation.objects.filter(account=account).count(),
        **burst_checks,
        # 8 threads x 6 reservations against a budget of exactly 10 worst cases.
        "race_admitted": race(),
        # The burst's count is exact only if every run tried to reserve before any
        # settled.
        "last_reserve": last_reserve,
        "first_settle": first_settle,
    }


def child(count: int, start_at: float) -> None:
    time.sleep(max(start_at - time.time(), 0))
    asyncio.run(start_runs("burst", count))


def child_until_refused() -> None:
    """One run after another, without token delays, until one is refused or cut short
    by the budget (at most 1,000: a budget that never runs out is a failure)."""
    from django.conf import settings

    from chat.models import Run

    settings.AGENT_OFFLINE_TOKEN_DELAY = 0

    async def until_refused() -> None:
        # One event loop for all: the checkpointer keeps a connection pool per loop.
        for _ in range(1000):
            [run_id] = await start_runs("burst", 1)
            run = await Run.objects.aget(id=run_id)
            if run.status == Run.Status.BUDGET_EXCEEDED:
                return
            if run.status != Run.Status.COMPLETED:
                raise SystemExit(f"run {run_id} {run.status}: {run.error_message}")
        raise SystemExit("the budget never ran out")

    asyncio.run(until_refused())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--budget-in-worst-cases", type=Decimal, default=Decimal("2.5"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--until-refused", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup()
    if args.until_refused:
        child_until_refused()
    elif args.child:
        child(args.child, args.start_at)
    else:
        print(json.dumps(parent(args)))


if __name__ == "__main__":
    main()
