"""The agent graph: model -> tools -> model ... until an answer or the step limit."""

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, SystemMessage
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode
from langgraph.runtime import Runtime

from .budget import RunBudget
from .context import Context
from .history import fit_to_budget, skipped_tool_result
from .models import load_chat_model
from .prompts import STEP_LIMIT_MESSAGE, SYSTEM_PROMPT
from .state import State
from .tools import TOOLS, ToolInputError

logger = logging.getLogger(__name__)


ModelFactory = Callable[[], BaseChatModel]


def make_model_node(
    load_model: ModelFactory, budget: RunBudget | None
) -> Callable[..., Awaitable[State]]:
    async def call_model(state: State, runtime: Runtime[Context]) -> State:
        model = load_model().bind_tools(TOOLS)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        history = fit_to_budget(state["messages"], runtime.context.context_tokens)
        prompt = [SystemMessage(SYSTEM_PROMPT.format(now=now)), *history]
        # The call's id is its LLM span's id: the ledger row and the trace share it.
        call_id = uuid.uuid4()
        if budget is None:
            response = await model.ainvoke(prompt, {"run_id": call_id})
        else:
            reservation = await budget.reserve(call_id=call_id, prompt=prompt)
            # Cut short here (cancel, failure, deadline), the call stays reserved: the
            # run's finish settles it with what it streamed.
            response = await model.ainvoke(prompt, {"run_id": call_id})
            await budget.settle(reservation, response)
        return {"messages": [response], "steps": state.get("steps", 0) + 1}

    return call_model


def stop_at_step_limit(state: State, runtime: Runtime[Context]) -> State:
    """End the run with an explanation instead of a crash; the pending tool calls are
    answered so the stored history stays valid for the next turn."""
    last = state["messages"][-1]
    assert isinstance(last, AIMessage)
    skipped = [skipped_tool_result(call) for call in last.tool_calls]
    explanation = AIMessage(content=STEP_LIMIT_MESSAGE.format(steps=runtime.context.max_steps))
    return {"messages": [*skipped, explanation]}


def route_model_output(
    state: State, runtime: Runtime[Context]
) -> Literal["tools", "stop_at_step_limit", "__end__"]:
    last = state["messages"][-1]
    if not isinstance(last, AIMessage) or not last.tool_calls:
        return "__end__"
    if state.get("steps", 0) >= runtime.context.max_steps:
        return "stop_at_step_limit"
    return "tools"


def tool_error_message(error: Exception) -> str:
    # Whatever went wrong, the model gets a message it can react to and the run goes on.
    if not isinstance(error, ToolInputError):
        logger.warning("tool failed", exc_info=error)
    return f"Error: {error}"


AgentGraph = CompiledStateGraph[State, Context, State, State]


def build_graph(
    checkpointer: BaseCheckpointSaver | None = None,
    load_model: ModelFactory = load_chat_model,
    budget: RunBudget | None = None,
) -> AgentGraph:
    """The agent. Without a `budget` its calls are not metered (tests of the graph
    alone); every run the runner executes has one."""
    builder = StateGraph(State, context_schema=Context)
    builder.add_node("call_model", make_model_node(load_model, budget))
    builder.add_node("tools", ToolNode(TOOLS, handle_tool_errors=tool_error_message))
    builder.add_node("stop_at_step_limit", stop_at_step_limit)
    builder.add_edge(START, "call_model")
    builder.add_conditional_edges("call_model", route_model_output)
    builder.add_edge("tools", "call_model")
    builder.add_edge("stop_at_step_limit", END)
    return builder.compile(checkpointer=checkpointer, name="agentsite")
