"""Conversation memory lives in LangGraph's checkpoint savers, never in process memory."""

import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from chat.agent.checkpointer import open_saver
from chat.agent.context import Context
from chat.agent.graph import build_graph
from chat.tests.test_graph import ScriptedModel
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
    context = Context(
        run_id=uuid.uuid4(),
        conversation_id=uuid.UUID(thread_id),
        user_id=1,
        max_steps=4,
        context_tokens=4000,
    )
    await graph.ainvoke(
        {"messages": [HumanMessage(text)], "steps": 0},
        {"configurable": {"thread_id": thread_id}},
        context=context,
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
