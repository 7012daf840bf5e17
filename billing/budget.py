"""Budget enforcement (services): what an account may still spend, held against calls in
flight so concurrent runs cannot overrun a limit.

Before each LLM call its worst case (estimated prompt + the maximum output, at the
model's price) is reserved, atomically, against the account's daily, monthly, token and
per-run limits. When what the limits leave cannot cover the call's full output, the call
is granted less: its output cap (`max_tokens`) is lowered to what is left, so it can
still never cost more than the limits allow; only a call that cannot be granted even
`min_output_tokens` (a short answer) is refused. When the call ends it is settled: its
ledger row is written and its actual cost moves from "reserved" to "spent" in the same
transaction. A call cut short (cancel, failure, deadline) is settled when its run
finishes, with the usage the run saw; a run whose process died, when it is closed for
dead, with the usage it had recorded. Holds left by runs that are over (a finish that
failed) are released before the account's next run is admitted.

Atomicity: reservations and run admissions of one account serialize on its row lock
(taken in its own statement on PostgreSQL; SQLite transactions are IMMEDIATE, one
writer at a time), so each check sees every hold before it. Settling needs no lock: it
moves money from reserved to spent in one UPDATE. The guarantee is as good as the
prompt estimate: a provider that counts more tokens than the estimate is billed what it
counted (the ledger is the truth), and a warning names the call.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID

from django.contrib.auth import get_user_model
from django.db import connection, transaction

from agentsite.errors import ApplicationError
from agentsite.formatting import format_usd as usd

from . import budget_sql as sql
from .models import BudgetReservation, ModelPrice, UsageRecord
from .pricing import cost_of, price_for_model
from .quotas import AccountLimits
from .selectors import utc_today

logger = logging.getLogger(__name__)

HOW_TO_RAISE = "An operator can raise it in the admin (Billing → Accounts or Plans)."


class BudgetExceeded(ApplicationError):
    """The next LLM call could cost more than what a limit leaves."""

    def __init__(self, message: str, remedy: str = HOW_TO_RAISE) -> None:
        super().__init__("budget_exceeded", f"{message} {remedy}", http_status=402)


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    # Not (all) reported by the provider: our estimate, flagged in the ledger.
    estimated: bool = False


@dataclass(frozen=True)
class RunCost:
    """A run's calls according to the ledger: the total cost (None if any call is
    unpriced), each call's cost and tokens by span id (for the trace), and the token
    totals."""

    total_usd: Decimal | None
    span_costs: dict[UUID, Decimal | None]
    span_usage: dict[UUID, Usage]
    input_tokens: int
    output_tokens: int
    cached_tokens: int


def budget_reserve(
    *,
    account_id: int,
    user_id: int,
    run_id: UUID,
    call_id: UUID,
    model: str,
    prompt_tokens: int,
    api_key_id: int | None = None,
    api_key_prefix: str = "",
    max_output_tokens: int,
    min_output_tokens: int = 1,
    settle_first: tuple[BudgetReservation, Usage] | None = None,
) -> BudgetReservation:
    """Hold the worst case of one LLM call: its prompt and up to `max_output_tokens` of
    output, or as much output as the limits leave if that is less but at least
    `min_output_tokens` (the reservation's `output_tokens` is the cap to call with).
    Otherwise raise `BudgetExceeded` naming the limit. An unpriced model reserves its
    tokens but no money: its cost is unknown, and it is flagged in the ledger when
    settled.

    `settle_first`: the run's previous call and its usage, settled (`budget_settle`) in
    the same transaction, before the check, and kept even if this call is refused. A
    run's calls come one after another, so settling each with the next reserve (or with
    the run's close) saves a transaction per call; until then the call stays held at
    its worst case, which only ever makes the check stricter.

    `api_key_id`/`api_key_prefix`: the key that started the run (none: the browser),
    carried to the call's ledger row."""
    day = utc_today()
    least = min(min_output_tokens, max_output_tokens)
    with transaction.atomic(), connection.cursor() as cursor:
        if settle_first is not None:
            # The account first, as every writer of its counters does (no deadlocks).
            sql.account_lock(cursor, account_id=account_id)
            budget_settle(reservation=settle_first[0], usage=settle_first[1])
        state = sql.account_state_lock(
            cursor, account_id=account_id, run_id=run_id, day=day, model=model
        )
        price = state.price or price_for_model(model=model)
        try:
            if price is None and _has_money_limit(state):
                raise BudgetExceeded(
                    f"The model {model!r} has no price, so its calls cannot be held against "
                    "the account's money limits.",
                    remedy="An operator can add its price in the admin (Billing → Model prices).",
                )
            # Refused only if not even the shortest answer fits; else granted what fits.
            _check(
                state,
                amount=_cost(price, prompt_tokens=prompt_tokens, output_tokens=least),
                tokens=prompt_tokens + least,
            )
        except BudgetExceeded as error:
            # Nothing written for this call; what `settle_first` wrote is committed.
            refused = error
        else:
            output_tokens = _grant(
                state, price=price, prompt_tokens=prompt_tokens, wanted=max_output_tokens
            )
            amount = _cost(price, prompt_tokens=prompt_tokens, output_tokens=output_tokens)
            tokens = prompt_tokens + output_tokens
            sql.daily_hold(cursor, account_id=account_id, day=day, amount=amount, tokens=tokens)
            reservation = BudgetReservation(
                id=call_id,
                account_id=account_id,
                user_id=user_id,
                run_id=run_id,
                api_key_id=api_key_id,
                api_key_prefix=api_key_prefix,
                day=day,
                model=model,
                amount_usd=amount,
                prompt_tokens=prompt_tokens,
                tokens=tokens,
            )
            sql.insert(cursor, reservation)
            return reservation
    raise refused


def _cost(price: ModelPrice | None, *, prompt_tokens: int, output_tokens: int) -> Decimal:
    if price is None:
        return Decimal(0)
    return cost_of(price=price, input_tokens=prompt_tokens, output_tokens=output_tokens)


def _grant(
    state: sql.AccountState, *, price: ModelPrice | None, prompt_tokens: int, wanted: int
) -> int:
    """The most output, up to `wanted`, that every limit still leaves room for (with the
    prompt), checked by `_check` to be at least the shortest answer."""
    granted = wanted
    if state.tokens_per_day is not None:
        granted = min(granted, state.tokens_per_day - state.today_tokens - prompt_tokens)
    if price is None or price.output_per_mtok <= 0:
        return granted
    for limit, used in (
        (state.money_per_run_usd, state.run_usd),
        (state.money_per_day_usd, state.today_usd),
        (state.money_per_month_usd, state.month_usd),
    ):
        if limit is None:
            continue
        left = limit - used
        prompt_micro_usd = prompt_tokens * price.input_per_mtok
        affordable = int((left * 1_000_000 - prompt_micro_usd) / price.output_per_mtok)
        # cost_of rounds the total half up: step down until the rounded cost fits.
        while (
            affordable > 0
            and _cost(price, prompt_tokens=prompt_tokens, output_tokens=affordable) > left
        ):
            affordable -= 1
        granted = min(granted, affordable)
    return granted


def _has_money_limit(state: sql.AccountState) -> bool:
    limits = (state.money_per_day_usd, state.money_per_month_usd, state.money_per_run_usd)
    return any(limit is not None for limit in limits)


def _check(state: sql.AccountState, *, amount: Decimal, tokens: int) -> None:
    in_flight = "including answers still in progress"
    if state.money_per_run_usd is not None and state.run_usd + amount > state.money_per_run_usd:
        raise BudgetExceeded(
            f"This answer stopped at the limit of {usd(state.money_per_run_usd)} per run: it "
            f"has cost {usd(state.run_usd)} so far and even a short next step would cost "
            f"{usd(amount)}."
        )
    if state.money_per_day_usd is not None and state.today_usd + amount > state.money_per_day_usd:
        raise BudgetExceeded(
            f"The account's daily budget of {usd(state.money_per_day_usd)} is used up "
            f"({usd(state.today_usd)} spent or held today, {in_flight}; even a short next "
            f"step would cost {usd(amount)}). It renews at 00:00 UTC."
        )
    if (
        state.money_per_month_usd is not None
        and state.month_usd + amount > state.money_per_month_usd
    ):
        raise BudgetExceeded(
            f"The account's monthly budget of {usd(state.money_per_month_usd)} is used up "
            f"({usd(state.month_usd)} spent or held this month, {in_flight}; even a short "
            f"next step would cost {usd(amount)}). It renews on the 1st, 00:00 UTC."
        )
    if state.tokens_per_day is not None and state.today_tokens + tokens > state.tokens_per_day:
        raise BudgetExceeded(
            f"The account's limit of {state.tokens_per_day:,} tokens per day is used up "
            f"({state.today_tokens:,} used or held today, {in_flight}; even a short next "
            f"step would use {tokens:,}). It renews at 00:00 UTC."
        )


def _user_if_any(user_id: int | None) -> int | None:
    exists = user_id is not None and get_user_model().objects.filter(pk=user_id).exists()
    return user_id if exists else None


def budget_settle(*, reservation: BudgetReservation, usage: Usage) -> bool:
    """Record the call in the ledger at its actual cost and free its reservation, in one
    transaction. A call whose hold was already released (its run was given up for dead
    while it still ran) is recorded all the same: what was spent is never lost. False if
    it was recorded before (nothing is counted twice). An unpriced call is recorded with
    its tokens, flagged, never free."""
    # No savepoint of its own where a caller's transaction holds it (a reserve, a close).
    with transaction.atomic(savepoint=False), connection.cursor() as cursor:
        held, user_id = sql.reservation_take(cursor, reservation_id=reservation.id)
        if not held:
            if UsageRecord.objects.filter(span_id=reservation.id).exists():
                return False
            user_id = _user_if_any(reservation.user_id)
        price = price_for_model(model=reservation.model)
        cost = (
            cost_of(
                price=price,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_tokens=usage.cached_tokens,
            )
            if price is not None
            else None
        )
        sql.insert(
            cursor,
            UsageRecord(
                account_id=reservation.account_id,
                # As the row has it now: its user may have been deleted mid-run.
                user_id=user_id,
                run_id=reservation.run_id,
                api_key_id=reservation.api_key_id,
                api_key_prefix=reservation.api_key_prefix,
                span_id=reservation.id,
                model=reservation.model,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_tokens=usage.cached_tokens,
                cost_usd=cost,
                price_missing=price is None,
                usage_estimated=usage.estimated,
                reserved_usd=reservation.amount_usd,
            ),
        )
        sql.daily_settle(
            cursor,
            reservation=reservation,
            held=held,
            cost=cost or Decimal(0),
            tokens=usage.input_tokens + usage.output_tokens,
        )
    if price is None:
        logger.warning(
            "run %s: no price for model %r; its usage is recorded unpriced "
            "(add a ModelPrice in the admin)",
            reservation.run_id,
            reservation.model,
        )
    elif cost is not None and cost > reservation.amount_usd:
        # The prompt estimate was low (a tokenizer denser than ~4 characters a token).
        logger.warning(
            "run %s: call %s cost %s, more than the %s reserved",
            reservation.run_id,
            reservation.id,
            cost,
            reservation.amount_usd,
        )
    return True


def budget_release_stale(*, account_id: int, active_run_ids: Iterable[UUID]) -> int:
    """Free the account's holds whose run is over (not in `active_run_ids`, which may be
    a query of them): a finish that failed to settle them. Their calls' usage was never
    reported, so nothing is recorded. (A run whose process died keeps its hold until the
    reaper closes it and settles it for what it streamed.) Returns how many were freed."""
    stale = list(
        BudgetReservation.objects.filter(account_id=account_id).exclude(run_id__in=active_run_ids)
    )
    if not stale:  # nearly always: one query, no savepoint
        return 0
    released = 0
    with transaction.atomic(), connection.cursor() as cursor:
        for reservation in stale:
            released += sql.reservation_release(cursor, reservation=reservation)
    return released


def usage_close_run(*, run_id: UUID, seen: Usage) -> RunCost:
    """Settle what a finishing run still holds; return what it cost, by the ledger.

    `seen` is the usage the run showed the user. A call cut short (cancel, failure,
    deadline) is still reserved: if it streamed output, the provider processed its
    prompt, so it is billed the estimated prompt and the output the run saw; if it
    streamed nothing it is released. So the ledger never bills less than was shown."""
    # What is recorded already is summed here, from the rows the cost is made of anyway:
    # nearly always nothing is still held, and these rows are the answer.
    rows = list(UsageRecord.objects.filter(run_id=run_id))
    recorded = _run_cost(rows)
    unbilled_output = max(seen.output_tokens - recorded.output_tokens, 0)
    held = BudgetReservation.objects.filter(run_id=run_id).order_by("-created_at")
    settled = False
    for index, reservation in enumerate(held):
        if index == 0 and unbilled_output:
            usage = Usage(
                input_tokens=max(
                    seen.input_tokens - recorded.input_tokens, reservation.prompt_tokens
                ),
                output_tokens=unbilled_output,
                cached_tokens=max(seen.cached_tokens - recorded.cached_tokens, 0),
                estimated=True,
            )
            settled = budget_settle(reservation=reservation, usage=usage)
        else:
            with transaction.atomic(), connection.cursor() as cursor:
                sql.reservation_release(cursor, reservation=reservation)
    if settled:  # a cut call, recorded just now
        return _run_cost(list(UsageRecord.objects.filter(run_id=run_id)))
    return recorded


def _run_cost(rows: list[UsageRecord]) -> RunCost:
    """A run's cost from its ledger rows: summed in Python, exactly (SQLite would add the
    decimals as floats)."""
    costs = [row.cost_usd for row in rows]
    total = None if None in costs else sum((c for c in costs if c is not None), Decimal(0))
    return RunCost(
        total_usd=total,
        span_costs={row.span_id: row.cost_usd for row in rows if row.span_id is not None},
        span_usage={
            row.span_id: Usage(row.input_tokens, row.output_tokens, row.cached_tokens)
            for row in rows
            if row.span_id is not None
        },
        input_tokens=sum(row.input_tokens for row in rows),
        output_tokens=sum(row.output_tokens for row in rows),
        cached_tokens=sum(row.cached_tokens for row in rows),
    )


def account_lock(*, account_id: int) -> None:
    """Lock the account for the rest of the transaction, as a reservation does: take it
    before anything else that writes the account's counters, so lock order is the same
    everywhere (no deadlocks)."""
    with connection.cursor() as cursor:
        sql.account_lock(cursor, account_id=account_id)


# Seconds a client refused for the concurrent-runs limit is told to wait (Retry-After,
# `retry_after`). When a slot frees is unknowable (a run ends when its answer does), so
# this is a polling interval: short beside a typical answer, long enough not to hammer.
CONCURRENT_RUNS_RETRY_AFTER = 5


def runs_admit(*, limits: AccountLimits, active_runs: int) -> None:
    """Refuse a new run when the account already has as many under way (`active_runs`)
    as its `limits` allow. Count them after `account_lock`, in the transaction that
    creates the run, so two simultaneous starts count each other."""
    limit = limits.concurrent_runs
    if limit is None:
        return
    if active_runs >= limit:
        raise ApplicationError(
            "concurrent_runs_limit",
            f"This account may have {limit} answer{'s' if limit != 1 else ''} in progress "
            f"at once, and has {active_runs}. Wait for one to finish or stop one. {HOW_TO_RAISE}",
            http_status=429,
            retry_after=CONCURRENT_RUNS_RETRY_AFTER,
        )
