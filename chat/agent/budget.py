"""The run's side of billing: reserve each model call's worst case before it is made and
settle its actual usage after (billing.budget does the accounting)."""

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from channels.db import database_sync_to_async
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.utils import count_tokens_approximately

from billing.budget import BudgetExceeded, Usage, budget_reserve
from billing.models import BudgetReservation
from tracing.capture import message_tokens

from .tools import TOOLS

PROMPT_CHARS_PER_TOKEN = 3.0


# Set in a reply's response_metadata when its usage_metadata is our estimate.
USAGE_ESTIMATED = "usage_estimated"


def usage_of(message: AIMessage) -> Usage:
    """What the provider reported for a reply (or what `with_usage_estimate` filled in);
    nothing if it reported nothing."""
    if not message.usage_metadata:
        return Usage()
    input_tokens, output_tokens, cached_tokens = message_tokens(message)
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_tokens=cached_tokens,
        estimated=bool(message.response_metadata.get(USAGE_ESTIMATED)),
    )


def prompt_tokens_estimate(prompt: Sequence[BaseMessage]) -> int:
    """The tokens of a call's prompt, over- rather than under-estimated.

    The tools' schemas are sent with every call and billed as input. Three characters a
    token, not the usual four: real tokenizers count code, numbers and most languages
    other than English denser, and a low estimate lets a call cost more than it held."""
    return count_tokens_approximately(
        prompt, tools=list(TOOLS), chars_per_token=PROMPT_CHARS_PER_TOKEN
    )


def with_usage_estimate(reply: AIMessage, *, prompt_tokens: int) -> AIMessage:
    """`reply`, with what its provider left out of its usage estimated: the input as
    `prompt_tokens`, the output from what it streamed. A server that reports no usage
    is never billed nothing; the estimate is flagged (USAGE_ESTIMATED)."""
    usage = reply.usage_metadata
    input_tokens = usage["input_tokens"] if usage else 0
    output_tokens = usage["output_tokens"] if usage else 0
    if input_tokens > 0 and (output_tokens > 0 or not _has_output(reply)):
        return reply
    if input_tokens <= 0:
        input_tokens = prompt_tokens
    if output_tokens <= 0 and _has_output(reply):
        produced = AIMessage(
            content=reply.content,
            tool_calls=reply.tool_calls,
            invalid_tool_calls=reply.invalid_tool_calls,
        )
        output_tokens = count_tokens_approximately(
            [produced], chars_per_token=PROMPT_CHARS_PER_TOKEN
        )
    details = usage.get("input_token_details") if usage else None
    estimate: UsageMetadata = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
    if details:
        estimate["input_token_details"] = details
    return reply.model_copy(
        update={
            "usage_metadata": estimate,
            "response_metadata": {**reply.response_metadata, USAGE_ESTIMATED: True},
        }
    )


def _has_output(reply: AIMessage) -> bool:
    return bool(reply.text or reply.tool_calls or reply.invalid_tool_calls)


@dataclass(kw_only=True)
class RunBudget:
    """Meters one run's model calls. Each call is reserved before it is made; its
    settling waits for the next call's reserve, or the run's close, and is done in their
    transaction (`budget_reserve`'s `settle_first`): one hop to the database per call,
    not two. Until then the call stays held at its worst case."""

    account_id: int
    user_id: int
    run_id: UUID
    # The key that started the run (None: the browser), named on its ledger rows.
    api_key_id: int | None = None
    api_key_prefix: str = ""
    model: str
    max_output_tokens: int
    # The least output a call may be granted (a short answer); below it, refused.
    min_output_tokens: int = 1
    # The last call, made and not settled yet, with its usage.
    unsettled: tuple[BudgetReservation, Usage] | None = None

    async def reserve(self, *, call_id: UUID, prompt: Sequence[BaseMessage]) -> BudgetReservation:
        """Hold the call's worst case, or raise billing's `BudgetExceeded`; the
        reservation's `output_tokens` is the output cap to call with."""
        prompt_tokens = prompt_tokens_estimate(prompt)
        try:
            reservation = await database_sync_to_async(budget_reserve)(
                account_id=self.account_id,
                user_id=self.user_id,
                run_id=self.run_id,
                api_key_id=self.api_key_id,
                api_key_prefix=self.api_key_prefix,
                call_id=call_id,
                model=self.model,
                prompt_tokens=prompt_tokens,
                max_output_tokens=self.max_output_tokens,
                min_output_tokens=self.min_output_tokens,
                settle_first=self.unsettled,
            )
        except BudgetExceeded:
            self.unsettled = None  # refused, but settled all the same
            raise
        # Cut short before this (a cancel, a failure), it is the run's close that settles
        # the last call; settling twice counts nothing twice (`budget_settle`).
        self.unsettled = None
        return reservation

    def settle(self, reservation: BudgetReservation, reply: AIMessage) -> None:
        """The call is over: settled with the next reserve, or the run's close."""
        self.unsettled = (reservation, usage_of(reply))
