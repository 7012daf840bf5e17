"""The run's side of billing: reserve each model call's worst case before it is made and
settle its actual usage after (billing.budget does the accounting)."""

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from channels.db import database_sync_to_async
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.utils import count_tokens_approximately

from billing.budget import Usage, budget_reserve, budget_settle
from billing.models import BudgetReservation

from .tools import TOOLS

PROMPT_CHARS_PER_TOKEN = 3.0


def usage_of(message: AIMessage) -> Usage:
    """What the provider reported for a reply; nothing if it reported nothing."""
    usage = message.usage_metadata
    if not usage:
        return Usage()
    return Usage(
        input_tokens=usage["input_tokens"],
        output_tokens=usage["output_tokens"],
        cached_tokens=(usage.get("input_token_details") or {}).get("cache_read") or 0,
    )


@dataclass(frozen=True, kw_only=True)
class RunBudget:
    account_id: int
    user_id: int
    run_id: UUID
    model: str
    max_output_tokens: int

    async def reserve(self, *, call_id: UUID, prompt: Sequence[BaseMessage]) -> BudgetReservation:
        """Hold the call's worst case, or raise billing's `BudgetExceeded`."""
        # The tools' schemas are sent with every call and billed as input. Three
        # characters a token, not the usual four: real tokenizers count code, numbers and
        # most languages other than English denser, and a low estimate lets a call
        # cost more than it held.
        prompt_tokens = count_tokens_approximately(
            prompt, tools=list(TOOLS), chars_per_token=PROMPT_CHARS_PER_TOKEN
        )
        return await database_sync_to_async(budget_reserve)(
            account_id=self.account_id,
            user_id=self.user_id,
            run_id=self.run_id,
            call_id=call_id,
            model=self.model,
            prompt_tokens=prompt_tokens,
            max_output_tokens=self.max_output_tokens,
        )

    async def settle(self, reservation: BudgetReservation, reply: AIMessage) -> None:
        await database_sync_to_async(budget_settle)(reservation=reservation, usage=usage_of(reply))
