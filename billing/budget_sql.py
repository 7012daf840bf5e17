"""The statements budget.py runs around every LLM call, written as SQL.

Why not the ORM here: benchmarks/budget_reservation.py measured a reservation through
the ORM at 4.4 ms p50 on PostgreSQL, 2.9 ms of it Python building seven queries, four
times the 1 ms a quota check may add to a model call. Here a reservation is one locking
read (limits, totals, the run's spend and the price in one row), one upsert and one
insert. The SQL runs unchanged on PostgreSQL and SQLite (upserts need SQLite ≥ 3.24),
and every value is adapted by its model field, so rows read back exactly as if the ORM
had written them.
"""

from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.db import connection
from django.db.backends.utils import CursorWrapper
from django.db.models import Model

from agentsite.db import db_value

from .models import Account, BudgetReservation, DailySpend, ModelPrice, Plan, UsageRecord
from .pricing import COST_QUANTUM

ACCOUNT = Account._meta.db_table
PLAN = Plan._meta.db_table
DAILY = DailySpend._meta.db_table
LEDGER = UsageRecord._meta.db_table
PRICE = ModelPrice._meta.db_table
RESERVATION = BudgetReservation._meta.db_table


def _decimal(value: Any) -> Decimal:
    # SQLite stores decimal columns with numeric affinity: sums come back as floats.
    if isinstance(value, Decimal):
        return value
    return Decimal(str(value)).quantize(COST_QUANTUM)


def _maybe_decimal(value: Any) -> Decimal | None:
    return None if value is None else _decimal(value)


@dataclass(frozen=True)
class AccountState:
    """What a reservation is checked against, read under the account's row lock."""

    money_per_day_usd: Decimal | None
    money_per_month_usd: Decimal | None
    money_per_run_usd: Decimal | None
    tokens_per_day: int | None
    month_usd: Decimal  # spent and held this month
    today_usd: Decimal
    today_tokens: int
    run_usd: Decimal  # what the run has spent so far
    # The model's exact-name price (None: no exact row; the caller tries the globs).
    price: ModelPrice | None


# An account's own limit, else its plan's: the rule of quotas.account_limits.
_LIMITS = ("money_per_day_usd", "money_per_month_usd", "money_per_run_usd", "tokens_per_day")
_STATE = f"""
SELECT {", ".join(f"COALESCE(a.{name}, p.{name})" for name in _LIMITS)},
  d.month_usd, d.today_usd, d.today_tokens,
  (SELECT COALESCE(SUM(cost_usd), 0) FROM {LEDGER} WHERE run_id = %(run)s),
  price.input_per_mtok, price.output_per_mtok
FROM {ACCOUNT} a
  LEFT JOIN {PLAN} p ON p.id = a.plan_id
  LEFT JOIN {PRICE} price ON price.model = %(model)s AND price.active
  CROSS JOIN (
    SELECT COALESCE(SUM(spent_usd + reserved_usd), 0) AS month_usd,
      COALESCE(SUM(CASE WHEN day = %(day)s THEN spent_usd + reserved_usd END), 0) AS today_usd,
      COALESCE(SUM(CASE WHEN day = %(day)s THEN tokens_spent + tokens_reserved END), 0)
        AS today_tokens
    FROM {DAILY} WHERE account_id = %(account)s AND day >= %(month)s
  ) d
WHERE a.id = %(account)s
"""


def account_lock(cursor: CursorWrapper, *, account_id: int) -> None:
    """Serialize this transaction with every other that spends from the account."""
    if connection.vendor == "postgresql":
        cursor.execute(f"SELECT id FROM {ACCOUNT} WHERE id = %s FOR NO KEY UPDATE", [account_id])


def account_state_lock(
    cursor: CursorWrapper, *, account_id: int, run_id: UUID, day: date, model: str
) -> AccountState:
    """Lock the account's row for this transaction, then read its state.

    Two statements on PostgreSQL, not one: a statement that waited for the lock keeps
    the snapshot it started with, so totals read in it would miss the reservation it
    waited for. The lock is NO KEY UPDATE: settling inserts ledger rows that reference
    the account (a KEY SHARE lock) and must not wait for reservations. SQLite's
    IMMEDIATE transaction already holds the only write lock."""
    account_lock(cursor, account_id=account_id)
    cursor.execute(
        _STATE,
        {
            "account": account_id,
            "month": db_value(DailySpend, "day", day.replace(day=1)),
            "day": db_value(DailySpend, "day", day),
            "run": db_value(UsageRecord, "run_id", run_id),
            "model": model,
        },
    )
    row = cursor.fetchone()
    if row is None:
        raise Account.DoesNotExist(f"No account {account_id}.")
    (
        day_limit,
        month_limit,
        run_limit,
        tokens_limit,
        month,
        today,
        tokens,
        run,
        rate_in,
        rate_out,
    ) = row
    price = None
    if rate_in is not None:
        # Reservations price the prompt at the full input rate: caching is not promised.
        price = ModelPrice(
            model=model, input_per_mtok=_decimal(rate_in), output_per_mtok=_decimal(rate_out)
        )
    return AccountState(
        money_per_day_usd=_maybe_decimal(day_limit),
        money_per_month_usd=_maybe_decimal(month_limit),
        money_per_run_usd=_maybe_decimal(run_limit),
        tokens_per_day=tokens_limit,
        month_usd=_decimal(month),
        today_usd=_decimal(today),
        today_tokens=int(tokens),
        run_usd=_decimal(run),
        price=price,
    )


def daily_hold(
    cursor: CursorWrapper, *, account_id: int, day: date, amount: Decimal, tokens: int
) -> None:
    """Add a reservation to the day's counters, making the day's row if it is the first."""
    cursor.execute(
        f"""
        INSERT INTO {DAILY}
            (account_id, day, spent_usd, reserved_usd, tokens_spent, tokens_reserved)
        VALUES (%s, %s, 0, %s, 0, %s)
        ON CONFLICT (account_id, day) DO UPDATE SET
            reserved_usd = {DAILY}.reserved_usd + excluded.reserved_usd,
            tokens_reserved = {DAILY}.tokens_reserved + excluded.tokens_reserved
        """,
        [
            account_id,
            db_value(DailySpend, "day", day),
            db_value(DailySpend, "reserved_usd", amount),
            tokens,
        ],
    )


def daily_settle(
    cursor: CursorWrapper,
    *,
    reservation: BudgetReservation,
    held: bool,
    cost: Decimal,
    tokens: int,
) -> None:
    """Add a call's actual use to the day's counters and, if its reservation was still
    `held`, take that out."""
    released = reservation.amount_usd if held else Decimal(0)
    cursor.execute(
        f"""
        UPDATE {DAILY} SET
            reserved_usd = reserved_usd - %s, tokens_reserved = tokens_reserved - %s,
            spent_usd = spent_usd + %s, tokens_spent = tokens_spent + %s
        WHERE account_id = %s AND day = %s
        """,
        [
            db_value(DailySpend, "reserved_usd", released),
            reservation.tokens if held else 0,
            db_value(DailySpend, "spent_usd", cost),
            tokens,
            reservation.account_id,
            db_value(DailySpend, "day", reservation.day),
        ],
    )


def reservation_delete(cursor: CursorWrapper, *, reservation_id: UUID) -> bool:
    cursor.execute(
        f"DELETE FROM {RESERVATION} WHERE id = %s",
        [db_value(BudgetReservation, "id", reservation_id)],
    )
    return cursor.rowcount > 0


def reservation_take(cursor: CursorWrapper, *, reservation_id: UUID) -> tuple[bool, int | None]:
    """Delete a reservation: whether it was held, and the user it names now (null once
    that user was deleted, which a copy read earlier does not know)."""
    cursor.execute(
        f"DELETE FROM {RESERVATION} WHERE id = %s RETURNING user_id",
        [db_value(BudgetReservation, "id", reservation_id)],
    )
    row = cursor.fetchone()
    return (True, row[0]) if row is not None else (False, None)


def reservation_release(cursor: CursorWrapper, *, reservation: BudgetReservation) -> bool:
    """Drop a reservation and its hold on the counters; False if it was already gone."""
    if not reservation_delete(cursor, reservation_id=reservation.id):
        return False
    daily_settle(cursor, reservation=reservation, held=True, cost=Decimal(0), tokens=0)
    return True


def insert(cursor: CursorWrapper, row: Model) -> None:
    """INSERT `row` as Model.save() would (defaults and auto_now_add applied), without
    reading it back: an auto id stays unset."""
    fields = [
        field
        for field in row._meta.concrete_fields
        if not (field.primary_key and getattr(row, field.attname) is None)
    ]
    values = [field.get_db_prep_save(field.pre_save(row, True), connection) for field in fields]
    # Concrete fields always have a column; the stubs type it as optional.
    columns = ", ".join(connection.ops.quote_name(str(field.column)) for field in fields)
    cursor.execute(
        f"INSERT INTO {row._meta.db_table} ({columns}) VALUES ({', '.join(['%s'] * len(fields))})",
        values,
    )
