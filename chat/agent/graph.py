"""The agent graph: model -> tools -> model ... until an answer or the step limit."""

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Literal

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, SystemMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode
from langgraph.runtime import Runtime

from billing.budget import BudgetExceeded

from .budget import with_usage_estimate
from .context import Context
from .errors import ProviderError
from .history import fit_to_budget, skipped_tool_result
from .models import load_chat_model, output_cap
from .prompts import CALLER_INSTRUCTIONS, STEP_LIMIT_MESSAGE, SYSTEM_PROMPT
from .replies import invalid_tool_result, reply_from_stream, stopped_at_output_cap
from .state import State
from .tools import TOOLS, ToolInputError

logger = logging.getLogger(__name__)


ModelFactory = Callable[[], BaseChatModel]


def make_model_node(load_model: ModelFactory) -> Callable[..., Awaitable[State]]:
    async def call_model(state: State, runtime: Runtime[Context]) -> State:
        budget = runtime.context.budget
        chat_model = load_model()
        model = chat_model.bind_tools(TOOLS)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        history = fit_to_budget(state["messages"], runtime.context.context_tokens)
        system = SYSTEM_PROMPT.format(now=now)
        if state.get("instructions"):
            system += CALLER_INSTRUCTIONS.format(instructions=state["instructions"])
        prompt = [SystemMessage(system), *history]
        # The call's id is its LLM span's id: the ledger row and the trace share it.
        call_id = uuid.uuid4()
        if budget is None:
            response = await _reply(model, prompt, {"run_id": call_id})
        else:
            reservation = await budget.reserve(call_id=call_id, prompt=prompt)
            granted = reservation.output_tokens
            capped = model.bind(**output_cap(chat_model, granted))
            # The LLM span reports the cap (tracing reads this metadata).
            requested = {"requested": budget.max_output_tokens, "granted": granted}
            config: RunnableConfig = {
                "run_id": call_id,
                "metadata": {"max_output_tokens": requested},
            }
            # Cut short here (cancel, failure, deadline), the call stays reserved: the
            # run's finish settles it with what it streamed.
            response = await _reply(capped, prompt, config)
            response = with_usage_estimate(response, prompt_tokens=reservation.prompt_tokens)
            budget.settle(reservation, response)
            if granted < budget.max_output_tokens and stopped_at_output_cap(response):
                raise BudgetExceeded(
                    f"This answer was cut short at {granted:,} tokens: that is all the "
                    "account's remaining budget could pay for."
                )
        return {"messages": [response], "steps": state.get("steps", 0) + 1}

    return call_model


async def _reply(
    model: Runnable[LanguageModelInput, BaseMessage],
    prompt: Sequence[BaseMessage],
    config: RunnableConfig,
) -> AIMessage:
    """Stream the model's reply (LangGraph relays the chunks to the run's stream) and
    return it whole, its tool calls checked (replies.py)."""
    whole: AIMessageChunk | None = None
    async for part in model.astream(prompt, config):
        # A model that does not stream hands over its whole reply as one message.
        chunk = part if isinstance(part, AIMessageChunk) else _as_chunk(part)
        whole = chunk if whole is None else whole + chunk
    if whole is None:
        raise ProviderError("provider_bad_response", "The model provider sent no reply at all.")
    return reply_from_stream(whole)


def _as_chunk(message: BaseMessage) -> AIMessageChunk:
    assert isinstance(message, AIMessage)
    return AIMessageChunk(**message.model_dump(exclude={"type"}))


def answer_invalid_tool_calls(state: State) -> State:
    """Answer the tool calls whose arguments were unusable with an error the model can
    act on (they never run); the valid ones of the same reply go on to the tools."""
    last = state["messages"][-1]
    assert isinstance(last, AIMessage)
    return {"messages": [invalid_tool_result(call) for call in last.invalid_tool_calls]}


def route_after_invalid_tool_calls(state: State) -> Literal["tools", "call_model"]:
    reply = next(m for m in reversed(state["messages"]) if isinstance(m, AIMessage))
    return "tools" if reply.tool_calls else "call_model"


# The explanation's id says what it is: the checkpointed messages of a run resumed after
# it had stopped at its limit (its process died before finishing it) must show as much.
STEP_LIMIT_ID_PREFIX = "step-limit-"


def is_step_limit_explanation(message: BaseMessage) -> bool:
    return isinstance(message, AIMessage) and (message.id or "").startswith(STEP_LIMIT_ID_PREFIX)


def stop_at_step_limit(state: State, runtime: Runtime[Context]) -> State:
    """End the run with an explanation instead of a crash; the pending tool calls are
    answered so the stored history stays valid for the next turn."""
    last = state["messages"][-1]
    assert isinstance(last, AIMessage)
    skipped = [skipped_tool_result(call) for call in last.tool_calls]
    skipped += [invalid_tool_result(call) for call in last.invalid_tool_calls]
    explanation = AIMessage(
        content=STEP_LIMIT_MESSAGE.format(steps=runtime.context.max_steps),
        id=f"{STEP_LIMIT_ID_PREFIX}{uuid.uuid4()}",
    )
    return {"messages": [*skipped, explanation]}


def route_model_output(
    state: State, runtime: Runtime[Context]
) -> Literal["tools", "answer_invalid_tool_calls", "stop_at_step_limit", "__end__"]:
    last = state["messages"][-1]
    if not isinstance(last, AIMessage) or not (last.tool_calls or last.invalid_tool_calls):
        return "__end__"
    if state.get("steps", 0) >= runtime.context.max_steps:
        return "stop_at_step_limit"
    if last.invalid_tool_calls:
        return "answer_invalid_tool_calls"
    return "tools"


def tool_error_message(error: Exception) -> str:
    # Whatever went wrong, the model gets a message it can react to and the run goes on.
    if not isinstance(error, ToolInputError):
        logger.warning("tool failed", exc_info=error)
    return f"Error: {error}"


AgentGraph = CompiledStateGraph[State, Context, State, State]


def build_graph(
    checkpointer: BaseCheckpointSaver | None = None, load_model: ModelFactory = load_chat_model
) -> AgentGraph:
    """The agent. Everything a run brings (its ids, limits and budget) comes with the
    run, in its `Context`: without a budget its calls are not metered (tests of the
    graph alone); every run the runner executes has one."""
    builder = StateGraph(State, context_schema=Context)
    builder.add_node("call_model", make_model_node(load_model))
    builder.add_node("tools", ToolNode(TOOLS, handle_tool_errors=tool_error_message))
    builder.add_node("answer_invalid_tool_calls", answer_invalid_tool_calls)
    builder.add_node("stop_at_step_limit", stop_at_step_limit)
    builder.add_edge(START, "call_model")
    builder.add_conditional_edges("call_model", route_model_output)
    builder.add_conditional_edges("answer_invalid_tool_calls", route_after_invalid_tool_calls)
    builder.add_edge("tools", "call_model")
    builder.add_edge("stop_at_step_limit", END)
    return builder.compile(checkpointer=checkpointer, name="agentsite")


@cache
def _compiled() -> AgentGraph:
    return build_graph()


def agent_graph(checkpointer: BaseCheckpointSaver) -> AgentGraph:
    """The agent, compiled once per process, saving to `checkpointer` (async savers are
    bound to their event loop, so the saver comes with each run). Compiling costs
    milliseconds (LangGraph inspects every node's code); a copy that only swaps the saver
    costs microseconds and shares the compiled nodes, which hold nothing of a run: what a
    run brings comes in its `Context`."""
    return _compiled().copy(update={"checkpointer": checkpointer})
