"""The agent graph on its own, with a scripted model standing in for the provider."""

import uuid
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.checkpoint.memory import InMemorySaver

from chat.agent.context import Context
from chat.agent.graph import build_graph
from chat.agent.history import close_dangling_tool_calls, fit_to_budget
from chat.agent.offline_model import OfflineChatModel
from chat.agent.prompts import TOOL_SKIPPED_MESSAGE


class ScriptedModel(BaseChatModel):
    """Answers with the scripted messages in order and records what it was sent."""

    script: list[AIMessage]
    prompts: list[list[BaseMessage]] = []

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        self.prompts.append(messages)
        return ChatResult(generations=[ChatGeneration(message=self.script.pop(0))])


def calculator_call(expression: str, call_id: str) -> AIMessage:
    return AIMessage(
        content="",
        tool_calls=[{"name": "calculator", "args": {"expression": expression}, "id": call_id}],
    )


def context(max_steps: int = 8, context_tokens: int = 6000) -> Context:
    return Context(
        run_id=uuid.uuid4(),
        conversation_id=uuid.uuid4(),
        user_id=1,
        max_steps=max_steps,
        context_tokens=context_tokens,
    )


def config() -> Any:
    return {"configurable": {"thread_id": str(uuid.uuid4())}}


async def test_model_tools_model_until_an_answer() -> None:
    model = ScriptedModel(
        script=[
            calculator_call("17 * 23", "call_1"),
            calculator_call("391 + 1", "call_2"),
            AIMessage(content="It is 392."),
        ],
        prompts=[],
    )
    graph = build_graph(InMemorySaver(), load_model=lambda: model)

    state = await graph.ainvoke(
        {"messages": [HumanMessage("What is 17 * 23 + 1?")], "steps": 0},
        config(),
        context=context(),
    )

    tool_results = [m.content for m in state["messages"] if isinstance(m, ToolMessage)]
    assert tool_results == ["391", "392"]
    assert state["messages"][-1].content == "It is 392."
    assert state["steps"] == 3
    # The second model call saw the first tool's result.
    assert any(isinstance(m, ToolMessage) and m.content == "391" for m in model.prompts[1])


async def test_step_limit_ends_with_an_explanation_and_a_valid_history() -> None:
    model = ScriptedModel(
        script=[calculator_call("1 + 1", "call_1"), calculator_call("2 + 2", "call_2")],
        prompts=[],
    )
    graph = build_graph(InMemorySaver(), load_model=lambda: model)

    state = await graph.ainvoke(
        {"messages": [HumanMessage("loop")], "steps": 0}, config(), context=context(max_steps=2)
    )

    last = state["messages"][-1]
    assert isinstance(last, AIMessage) and "2 steps" in last.content and not last.tool_calls
    # The call the limit interrupted is answered, so the next turn's history is valid.
    skipped = [m for m in state["messages"] if isinstance(m, ToolMessage) and m.status == "error"]
    assert [m.tool_call_id for m in skipped] == ["call_2"]


async def test_bad_tool_input_reaches_the_model_as_an_error_not_a_crash() -> None:
    model = ScriptedModel(
        script=[calculator_call("__import__('os').system('id')", "call_1"), AIMessage("Sorry.")],
        prompts=[],
    )
    graph = build_graph(InMemorySaver(), load_model=lambda: model)

    state = await graph.ainvoke(
        {"messages": [HumanMessage("hack")], "steps": 0}, config(), context=context()
    )

    result = next(m for m in state["messages"] if isinstance(m, ToolMessage))
    assert result.status == "error" and result.content.startswith("Error: Only numbers")
    assert state["messages"][-1].content == "Sorry."


async def test_history_persists_per_conversation_in_the_checkpoint() -> None:
    saver = InMemorySaver()
    model = ScriptedModel(script=[AIMessage("Hello Ada."), AIMessage("You are Ada.")], prompts=[])
    graph = build_graph(saver, load_model=lambda: model)
    thread = config()

    await graph.ainvoke(
        {"messages": [HumanMessage("I am Ada")], "steps": 0}, thread, context=context()
    )
    await graph.ainvoke(
        {"messages": [HumanMessage("Who am I?")], "steps": 0}, thread, context=context()
    )

    second_prompt = [m.content for m in model.prompts[1]]
    assert "I am Ada" in second_prompt and "Hello Ada." in second_prompt


async def test_long_history_is_trimmed_to_the_token_budget() -> None:
    model = ScriptedModel(script=[AIMessage("ok")], prompts=[])
    graph = build_graph(InMemorySaver(), load_model=lambda: model)
    history: list[BaseMessage] = []
    for turn in range(200):
        history += [HumanMessage(f"question {turn} " + "word " * 50), AIMessage("answer " * 50)]

    await graph.ainvoke(
        {"messages": [*history, HumanMessage("latest")], "steps": 0},
        config(),
        context=context(context_tokens=2000),
    )

    prompt = model.prompts[0]
    assert prompt[-1].content == "latest"
    assert len(prompt) < 50  # far fewer than the 401 stored messages
    assert isinstance(prompt[1], HumanMessage)  # a trimmed history starts on a human turn


def test_a_cancelled_tool_call_is_answered_before_the_next_turn() -> None:
    messages: list[Any] = [
        HumanMessage("hi"),
        calculator_call("1+1", "call_9"),
        HumanMessage("next"),
    ]

    repaired = close_dangling_tool_calls(messages)

    assert isinstance(repaired[2], ToolMessage)
    assert repaired[2].tool_call_id == "call_9" and repaired[2].content == TOOL_SKIPPED_MESSAGE
    assert repaired[3].content == "next"


@pytest.mark.parametrize("budget", [1, 10])
def test_an_oversized_latest_message_is_still_sent(budget: int) -> None:
    messages: list[Any] = [HumanMessage("x " * 500)]
    assert fit_to_budget(messages, budget) == messages


def test_an_unanswered_invalid_tool_call_is_answered_too() -> None:
    # A checkpoint from before invalid tool calls were answered: providers are sent the
    # call all the same, so it needs a result.
    broken = AIMessage(
        content="",
        invalid_tool_calls=[
            {"name": "calculator", "args": '"17 * 23"', "id": "call_bad", "error": None}
        ],
    )
    messages: list[Any] = [HumanMessage("17 * 23?"), broken, HumanMessage("next")]

    repaired = close_dangling_tool_calls(messages)

    assert isinstance(repaired[2], ToolMessage) and repaired[2].tool_call_id == "call_bad"
    assert repaired[3].content == "next"


def test_the_offline_model_stops_at_its_output_cap() -> None:
    model = OfflineChatModel()

    capped = model.invoke([HumanMessage("Tell me about yourself")], max_tokens=5)
    whole = model.invoke([HumanMessage("Tell me about yourself")])

    assert capped.usage_metadata is not None and capped.usage_metadata["output_tokens"] == 5
    assert capped.response_metadata["finish_reason"] == "length"
    assert whole.response_metadata["finish_reason"] == "stop"
    assert str(whole.content).startswith(str(capped.content))
