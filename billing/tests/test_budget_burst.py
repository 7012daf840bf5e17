"""200 runs from 4 processes at once against a daily budget that covers only some of them,
then the same processes one run after another until the budget is spent, and 48
reservations from 8 threads against a budget of exactly 10, on SQLite and on PostgreSQL
(budget_burst.py does the work in fresh databases)."""

import json
import math
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from tests.servers import postgres_available
from tests.servers import postgres_database as own_postgres_database

ROOT = Path(__file__).resolve().parents[2]
CENT_FRACTION = Decimal("0.00000001")  # the ledger's precision


def burst(database_url: str, tmp_path: Path) -> dict:
    env = {
        **os.environ,
        "AGENTSITE_READ_DOTENV": "false",
        "DEBUG": "true",
        "SECRET_KEY": "burst-test-" + "x" * 40,
        "LOG_LEVEL": "WARNING",
        "DATABASE_URL": database_url,
        "AGENT_CHECKPOINT_SQLITE_PATH": str(tmp_path / "checkpoints.sqlite3"),
        # Each completed run holds its reservation for seconds, so every run of the
        # burst tries to reserve while the admitted ones still hold theirs.
        "AGENT_OFFLINE_TOKEN_DELAY": "0.1",
    }
    env.pop("AGENT_REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "billing.tests.budget_burst", "--runs", "200", "--processes", "4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def postgres_database():
    with own_postgres_database("agentsite_burst") as database_url:
        yield database_url


def assert_the_budget_held(result: dict) -> None:
    budget = Decimal(result["budget_usd"])
    run_cost = Decimal(result["run_cost_usd"])
    worst_case = Decimal(result["call_reserved_usd"])
    least = Decimal(result["call_least_usd"])  # the worst case at the lowest output cap
    completed = result["statuses"].get("completed", 0)
    refused = result["statuses"].get("budget_exceeded", 0)
    burst_spent = Decimal(result["burst_spent_usd"]).quantize(CENT_FRACTION)
    spent = Decimal(result["ledger_spent_usd"]).quantize(CENT_FRACTION)

    assert result["runs"] == completed + refused == 200, result["statuses"]
    assert run_cost < least < worst_case  # so refusals come from the held worst cases
    # Never past the budget, and every cent of it in the ledger and the counters alike.
    assert spent <= budget
    assert Decimal(result["counter_spent_usd"]).quantize(CENT_FRACTION) == spent
    assert Decimal(result["counter_reserved_usd"]).quantize(CENT_FRACTION) == 0
    assert result["reservations_left"] == 0
    # The burst: as many worst cases as fit at once, and one more with its output capped
    # to the remainder, if that leaves room for a short answer. Exactly that many when
    # every run asked for its reservation before any settled (the admitted ones hold
    # theirs for about 6 s, longer than a quiet machine takes to start 200 runs); when
    # other work on the machine slowed the burst past that, runs that asked after a
    # settle were rightly admitted into the room it freed: at least that many then.
    full = math.floor(budget / worst_case)
    capped = 1 if budget - full * worst_case >= least else 0
    if result["last_reserve"] < result["first_settle"]:
        assert completed == full + capped, (full, capped, result["statuses"])
    else:
        assert completed >= full + capped, (full, capped, result["statuses"])
    assert burst_spent == completed * run_cost
    assert result["refused_messages_name_the_daily_budget"]
    assert result["refused_before_any_call"]
    # After it, the refused try again until refused: the money the burst held and did
    # not spend is spent, down to less than what one short answer needs. The burst
    # alone spends a small share (each admitted run holds far more than it spends).
    assert result["runs_after_the_burst"] > 0
    assert spent >= budget - least - run_cost, (spent, budget)
    assert spent >= budget * Decimal("0.8")
    # Straight through the service, from threads at once: exactly what fits, no more.
    assert result["race_admitted"] == 10


def test_a_burst_cannot_overspend_on_sqlite(tmp_path):
    assert_the_budget_held(burst(f"sqlite:///{tmp_path / 'burst.sqlite3'}", tmp_path))


@pytest.mark.skipif(
    not postgres_available(),
    reason="PostgreSQL is NOT reachable on 127.0.0.1:5432: the budget burst is untested there",
)
def test_a_burst_cannot_overspend_on_postgres(tmp_path, postgres_database):
    assert_the_budget_held(burst(postgres_database, tmp_path))
