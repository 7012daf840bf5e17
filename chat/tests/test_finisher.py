"""A run's finish: the budget left its final event carries, and what the finish costs
the database: its statements, counted exactly (a proxy for its work that does not
depend on the machine), on SQLite and on PostgreSQL, each in a fresh database of its
own (finish_statements.py does one turn there and prints them)."""

import importlib
import json
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from django.apps import apps
from django.conf import settings
from django.db import DatabaseError

from billing.cache import billing_cache_invalidate
from billing.display import budget_left
from billing.models import Account
from billing.pricing import cost_of, price_for_model
from billing.selectors import account_get, usage_summary
from chat import selectors
from chat.agent.models import model_info
from chat.events import event_log
from chat.models import Message, Run
from conftest import account_with_limits, open_socket, receive_until
from tests.conftest import _server_env
from tests.servers import postgres_available, postgres_database

ROOT = Path(__file__).resolve().parents[2]
# The seed migration's own function: the prices a fresh install starts with.
_seed = importlib.import_module("billing.migrations.0002_seed_model_prices")


def prices_seeded() -> None:
    """The seeded price table: an earlier transactional test may have emptied it."""
    _seed.seed(apps, None)
    billing_cache_invalidate()


async def final_event_of_a_turn(user) -> dict:
    from chat import services

    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    await socket.send_json_to({"type": "message", "content": "What is 17 * 23?"})
    frames = await receive_until(socket, "run.completed")
    await socket.disconnect()
    return (await event_log().after(uuid.UUID(frames[0]["run"]), 0))[-1].event()


def budget_left_by_the_ledger(account_id: int) -> dict:
    """What the account's counters leave, read from the database as they are now."""
    summary = usage_summary(account=account_get(account_id=account_id))
    price = price_for_model(model=model_info().name)
    assert price is not None
    left = budget_left(
        summary=summary,
        smallest_call_usd=cost_of(
            price=price, input_tokens=0, output_tokens=settings.AGENT_MAX_TOKENS
        ),
        smallest_call_tokens=settings.AGENT_MAX_TOKENS,
    )
    assert left is not None
    return left.as_data()


@pytest.mark.django_db(transaction=True)
async def test_the_final_event_carries_what_the_ledger_leaves(make_user):
    await database_sync_to_async(prices_seeded)()
    user = await database_sync_to_async(make_user)()
    account = await database_sync_to_async(account_with_limits)(
        user,
        money_per_day_usd=Decimal(5),
        money_per_month_usd=Decimal(50),
        tokens_per_day=1_000_000,
    )

    final = await final_event_of_a_turn(user)

    left = await database_sync_to_async(budget_left_by_the_ledger)(account.pk)
    assert final["budget"] == {"left": left}
    assert Decimal(left["day_usd"][0]) < 5  # the turn is in it


@pytest.mark.django_db(transaction=True)
async def test_the_final_event_shows_limits_changed_where_this_process_cache_missed_it(
    make_user,
):
    # An operator's edit in another process (a shell, another instance of the monolith)
    # leaves this process's cached limits as they were; a refusal reads them afresh,
    # and so must the budget line beside it.
    await database_sync_to_async(prices_seeded)()
    user = await database_sync_to_async(make_user)()
    account = await database_sync_to_async(account_with_limits)(user, money_per_day_usd=Decimal(5))
    await final_event_of_a_turn(user)  # the limits are cached now
    # An UPDATE sends no signal: nothing here hears of it, as of another process's edit.
    await Account.objects.filter(pk=account.pk).aupdate(money_per_day_usd=Decimal(7))

    final = await final_event_of_a_turn(user)

    assert final["budget"]["left"]["day_usd"][1] == "7.00000000"


@pytest.mark.django_db(transaction=True)
async def test_an_account_without_limits_has_none_left_to_show(make_user):
    user = await database_sync_to_async(make_user)()
    await database_sync_to_async(account_with_limits)(user)

    final = await final_event_of_a_turn(user)

    assert final["budget"] == {"left": None}


@pytest.mark.django_db(transaction=True)
async def test_a_budget_left_that_cannot_be_read_loses_the_line_not_the_answer(
    make_user, monkeypatch
):
    def unreadable(**kwargs):
        raise DatabaseError("the counters are unreadable")

    monkeypatch.setattr(selectors, "budget_left", unreadable)
    user = await database_sync_to_async(make_user)()

    final = await final_event_of_a_turn(user)

    assert final["budget"] is None  # unknown
    run = await Run.objects.aget(id=final["run"])
    assert run.status == Run.Status.COMPLETED
    assert "391" in final["messages"][0]["content"]
    assert await Message.objects.filter(run=run, role=Message.Role.ASSISTANT).aexists()


def finish_statements(database_url: str, tmp_path: Path) -> dict[str, list[str]]:
    env = {
        **_server_env(tmp_path),
        "DATABASE_URL": database_url,
        "LOG_LEVEL": "WARNING",
        "AGENT_OFFLINE_TOKEN_DELAY": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "chat.tests.finish_statements"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def kinds(statements: list[str]) -> list[str]:
    """Each statement as its verb and table (savepoints as one word), to compare."""
    named = []
    for sql in statements:
        words = sql.replace('"', "").split()
        verb = words[0].upper()
        if verb in {"SAVEPOINT", "RELEASE", "BEGIN", "COMMIT"}:
            named.append(verb)
        elif verb == "SELECT":
            table = words[words.index("FROM") + 1]
            locking = " FOR UPDATE" if "FOR UPDATE" in sql else ""
            named.append(f"SELECT {table}{locking}")
        elif verb == "INSERT":
            named.append(f"INSERT {words[2]}")
        elif verb == "DELETE":
            named.append(f"DELETE {words[2]}")
        else:
            named.append(f"{verb} {words[1]}")
    return named


# One transaction: the run's row locked and read once (with its conversation); the last
# call settled and the ledger's rows read once for the totals, in a savepoint; the run,
# its answer and its conversation; the trace in a savepoint. Then, committed, the
# account's limits and the month's counters for the budget left.
FINISH = [
    "BEGIN",
    "SELECT chat_run FOR UPDATE",  # SQLite's transaction holds its one write lock
    "SAVEPOINT",
    "DELETE billing_budgetreservation",
    "INSERT billing_usagerecord",
    "UPDATE billing_dailyspend",
    "SELECT billing_usagerecord",
    "SELECT billing_budgetreservation",
    "RELEASE",
    "UPDATE chat_run",
    "INSERT chat_message",
    "UPDATE chat_conversation",
    "SAVEPOINT",
    "INSERT tracing_trace",
    "INSERT tracing_span",
    "RELEASE",
    "COMMIT",
]
LIMITS = "SELECT billing_membership"  # with its account and plan
COUNTERS = "SELECT billing_dailyspend"


def assert_the_finish_is_lean(statements: dict[str, list[str]], *, row_locks: bool) -> None:
    expected = FINISH if row_locks else [kind.removesuffix(" FOR UPDATE") for kind in FINISH]
    assert kinds(statements["limits"]) == [*expected, LIMITS, COUNTERS]
    # An account without limits has no budget left to read.
    assert kinds(statements["no_limits"]) == [*expected, LIMITS]


def test_a_finish_is_one_transaction_of_few_statements_on_sqlite(tmp_path):
    statements = finish_statements(f"sqlite:///{tmp_path / 'db.sqlite3'}", tmp_path)
    assert_the_finish_is_lean(statements, row_locks=False)


@pytest.mark.postgres
@pytest.mark.skipif(
    not postgres_available(),
    reason="PostgreSQL is NOT reachable on 127.0.0.1:5432: the finish's statements there "
    "are uncounted",
)
def test_a_finish_is_one_transaction_of_few_statements_on_postgres(tmp_path):
    with postgres_database("agentsite_finish") as database_url:
        statements = finish_statements(database_url, tmp_path)
    assert_the_finish_is_lean(statements, row_locks=True)
