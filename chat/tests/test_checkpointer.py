"""Conversation memory lives in LangGraph's checkpoint savers, never in process memory."""

import asyncio
import contextlib
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.checkpoint.base import empty_checkpoint

from chat import services
from chat.agent.checkpointer import checkpointer, open_saver
from chat.agent.context import Context
from chat.agent.graph import build_graph
from chat.tests.test_graph import ScriptedModel
from conftest import account_with_limits, wait_for_runs
from tests.servers import POSTGRES, postgres_available

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgres",
        id="postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(
                not postgres_available(),
                reason="PostgreSQL is NOT reachable on 127.0.0.1:5432: Postgres saver untested",
            ),
        ],
    ),
]


async def turn(saver: Any, thread_id: str, text: str, reply: str) -> ScriptedModel:
    model = ScriptedModel(script=[AIMessage(reply)], prompts=[])
    graph = build_graph(saver, load_model=lambda: model)
    await graph.ainvoke(
        {"messages": [HumanMessage(text)], "steps": 0},
        {"configurable": {"thread_id": thread_id}},
        context=context_of(uuid.UUID(thread_id)),
    )
    return model


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_restart_loses_nothing(backend: str, tmp_path: Path) -> None:
    where: dict[str, Any] = {
        "postgres": POSTGRES if backend == "postgres" else None,
        "sqlite_path": tmp_path / "checkpoints.sqlite3",
    }
    thread_id = str(uuid.uuid4())

    before = await open_saver(**where)
    await turn(before, thread_id, "My name is Ada.", "Hello Ada.")
    await before.conn.close()  # the process goes away

    after = await open_saver(**where)  # a new process, or another instance
    model = await turn(after, thread_id, "What is my name?", "Ada.")
    await after.conn.close()

    sent = [m.content for m in model.prompts[0]]
    assert sent[-3:] == ["My name is Ada.", "Hello Ada.", "What is my name?"]


@pytest.mark.postgres
@pytest.mark.skipif(
    not postgres_available(),
    reason="PostgreSQL is NOT reachable on 127.0.0.1:5432: Postgres saver untested",
)
async def test_the_postgres_saver_pool_is_bounded(settings) -> None:
    # Part of each process's connection budget (DATABASE_POOL_SIZE in the settings).
    settings.AGENT_CHECKPOINT_POOL_SIZE = 3
    saver = await open_saver(postgres=POSTGRES, sqlite_path=None)
    try:
        assert saver.conn.max_size == 3
    finally:
        await saver.conn.close()


@pytest.mark.django_db(transaction=True)
async def test_a_run_saves_its_steps_as_it_goes_so_a_dead_one_resumes_after_its_tool(
    make_user,
) -> None:
    user = await database_sync_to_async(make_user)()
    await database_sync_to_async(account_with_limits)(user)
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    await database_sync_to_async(services.run_create)(
        conversation=conversation, content="What is 17 * 23?"
    )
    await asyncio.wait_for(wait_for_runs(), timeout=30)

    # What a process that died just after the calculator answered would have left.
    thread = {"configurable": {"thread_id": str(conversation.id)}}
    async with checkpointer() as saver:
        history = [s async for s in build_graph(saver).aget_state_history(thread)]
        [after_tool] = [
            step
            for step in history
            if step.next == ("call_model",) and isinstance(step.values["messages"][-1], ToolMessage)
        ]
        assert after_tool.values["messages"][-1].content == "391"

        # Resumed from there, the run asks the model for its answer; the tool is not run.
        model = ScriptedModel(script=[AIMessage("17 * 23 = 391.")], prompts=[])
        resumed = await build_graph(saver, load_model=lambda: model).ainvoke(
            None, after_tool.config, context=context_of(conversation.id)
        )
    added = resumed["messages"][len(after_tool.values["messages"]) :]
    assert [(type(m), m.content) for m in added] == [(AIMessage, "17 * 23 = 391.")]
    assert isinstance(model.prompts[0][-1], ToolMessage)


def context_of(conversation_id: uuid.UUID) -> Context:
    return Context(
        run_id=uuid.uuid4(),
        conversation_id=conversation_id,
        user_id=1,
        max_steps=4,
        context_tokens=4000,
    )


async def test_a_cancelled_checkpoint_write_leaves_the_file_unlocked(tmp_path):
    # A user's stop lands while the run's checkpoint is being written: the file must
    # not stay locked against every other connection (another process, a delete).
    path = tmp_path / "checkpoints.sqlite3"
    saver = await open_saver(postgres=None, sqlite_path=path)
    try:
        for step in range(5):
            config: Any = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
            checkpoint = {**empty_checkpoint(), "id": str(uuid.uuid4())}
            write = asyncio.ensure_future(saver.aput(config, checkpoint, {"step": step}, {}))
            await asyncio.sleep(0)  # its statement is on the connection's thread now
            write.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await write
        await asyncio.sleep(0.2)

        other = sqlite3.connect(path, timeout=1)
        try:
            other.execute("BEGIN IMMEDIATE")  # `database is locked` if one is left open
            other.rollback()
        finally:
            other.close()
    finally:
        await saver.conn.close()  # type: ignore[attr-defined]
