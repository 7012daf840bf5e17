"""Writes of billing: accounts on first need, and the usage ledger."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from uuid import UUID

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction

from chat.models import Run

from .models import Account, Membership, ModelPrice, UsageRecord
from .pricing import cost_of, price_for_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlmCall:
    """One LLM call's usage as the run saw it. `span_id` is its LLM span (None when the
    run was not traced); `reported` is False for a call that stopped before the provider
    reported its usage (a cancel, a failure, the deadline)."""

    span_id: UUID | None
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reported: bool = True


@dataclass
class RunCost:
    """What a run's calls cost: the total (None if any call is unpriced) and each
    traced call's cost by span id, for the trace."""

    total_usd: Decimal | None
    span_costs: dict[UUID, Decimal | None] = field(default_factory=dict)


def account_for_user(*, user_id: int) -> Account:
    """The user's account, created (a personal one) on first need. Race-safe: two first
    requests at once both end up with the one account the unique user link allows."""
    account = _account_of(user_id=user_id)
    if account is not None:
        return account
    user = get_user_model().objects.get(pk=user_id)
    try:
        with transaction.atomic():
            account = Account.objects.create(name=user.get_username())
            Membership.objects.create(user=user, account=account, role=Membership.Role.OWNER)
            return account
    except IntegrityError:
        return Membership.objects.select_related("account").get(user_id=user_id).account


def _account_of(*, user_id: int) -> Account | None:
    membership = Membership.objects.select_related("account").filter(user_id=user_id).first()
    return membership.account if membership is not None else None


def usage_calls_reconcile(
    *,
    calls: Sequence[LlmCall],
    model: str,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
) -> list[LlmCall]:
    """The calls to bill for a run whose totals (what the user was shown) are given.

    Usage the calls do not account for — a call stopped mid-stream, whose output the
    run estimated from the chunks it streamed, or every call of an untraced run — is
    billed to the last call that never reported its own, else as one call without a
    span. So the ledger never bills less than the run shows."""
    result = list(calls)
    missing = (
        max(input_tokens - sum(c.input_tokens for c in result), 0),
        max(output_tokens - sum(c.output_tokens for c in result), 0),
        max(cached_tokens - sum(c.cached_tokens for c in result), 0),
    )
    if not any(missing):
        return result
    for index in range(len(result) - 1, -1, -1):
        call = result[index]
        if not call.reported:
            result[index] = LlmCall(
                span_id=call.span_id,
                model=call.model,
                input_tokens=call.input_tokens + missing[0],
                output_tokens=call.output_tokens + missing[1],
                cached_tokens=call.cached_tokens + missing[2],
                reported=False,
            )
            return result
    result.append(LlmCall(None, model, *missing, reported=False))
    return result


def usage_record_run(*, run_id: UUID, user_id: int, calls: Sequence[LlmCall]) -> RunCost:
    """Price a finished run's LLM calls, append them to the ledger and store the run's
    cost, in one transaction. An unknown price never makes a call free: its tokens are
    recorded, its cost is null and flagged `price_missing`, and a warning is logged."""
    account = account_for_user(user_id=user_id)
    prices: dict[str, ModelPrice | None] = {}
    records = []
    span_costs: dict[UUID, Decimal | None] = {}
    for call in calls:
        if call.model not in prices:
            prices[call.model] = price_for_model(model=call.model)
            if prices[call.model] is None:
                logger.warning(
                    "run %s: no price for model %r; its usage is recorded unpriced "
                    "(add a ModelPrice in the admin)",
                    run_id,
                    call.model,
                )
        price = prices[call.model]
        cost = (
            cost_of(
                price=price,
                input_tokens=call.input_tokens,
                output_tokens=call.output_tokens,
                cached_tokens=call.cached_tokens,
            )
            if price is not None
            else None
        )
        records.append(
            UsageRecord(
                account=account,
                user_id=user_id,
                run_id=run_id,
                span_id=call.span_id,
                model=call.model,
                input_tokens=call.input_tokens,
                output_tokens=call.output_tokens,
                cached_tokens=call.cached_tokens,
                cost_usd=cost,
                price_missing=price is None,
            )
        )
        if call.span_id is not None:
            span_costs[call.span_id] = cost
    costs = [r.cost_usd for r in records]
    total = None if None in costs else sum((c for c in costs if c is not None), Decimal(0))
    with transaction.atomic():
        UsageRecord.objects.bulk_create(records)
        Run.objects.filter(id=run_id).update(cost_usd=total)
    return RunCost(total_usd=total, span_costs=span_costs)
