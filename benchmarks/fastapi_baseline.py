"""The bare pattern Agentsite is measured against (benchmarks/turn_cost.py): FastAPI
streaming Server-Sent Events from the same LangGraph graph and offline model, its state in
LangGraph's in-memory checkpointer. Nothing is persisted, traced, billed or rate-limited.

    uvicorn benchmarks.fastapi_baseline:app   (turn_cost.py starts it; Django settings
    come from the environment, as for Agentsite: the graph's modules read them)

POST /chat/<thread id> with {"content": "..."} streams `data: <json>` events: one per
token, one per tool call started and finished, and a final {"type": "done"}.
"""

import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.settings")
django.setup()

from fastapi import FastAPI  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from chat.agent.context import Context  # noqa: E402
from chat.agent.graph import build_graph  # noqa: E402
from chat.agent.models import load_chat_model  # noqa: E402

MAX_STEPS = 8
CONTEXT_TOKENS = 6000

# Compiled once per process, as the seed did; the model is AGENT_MODEL's (offline).
graph = build_graph(InMemorySaver(), load_model=load_chat_model)
app = FastAPI()


class Turn(BaseModel):
    content: str


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _events(thread_id: str, content: str) -> AsyncIterator[str]:
    context = Context(
        run_id=uuid.uuid4(),
        conversation_id=uuid.UUID(thread_id),
        user_id=0,
        max_steps=MAX_STEPS,
        context_tokens=CONTEXT_TOKENS,
    )
    config: Any = {"configurable": {"thread_id": thread_id}, "recursion_limit": MAX_STEPS * 3 + 10}
    parts = graph.astream(
        {"messages": [HumanMessage(content=content)], "steps": 0},
        config,
        context=context,
        stream_mode=["messages", "updates"],
    )
    # With several stream modes LangGraph yields (mode, data) pairs.
    async for mode, data in cast(AsyncIterator[tuple[str, Any]], parts):
        if mode == "messages":
            chunk, metadata = data
            if (
                metadata.get("langgraph_node") == "call_model"
                and isinstance(chunk, AIMessageChunk)
                and chunk.text
            ):
                yield _sse({"type": "token", "text": chunk.text})
            continue
        for update in data.values():
            for message in (update or {}).get("messages", []):
                if isinstance(message, AIMessage):
                    for call in message.tool_calls:
                        yield _sse({"type": "tool.started", "name": call["name"]})
                elif isinstance(message, ToolMessage):
                    yield _sse({"type": "tool.finished", "result": message.text})
    yield _sse({"type": "done"})


@app.post("/chat/{thread_id}")
async def chat(thread_id: str, turn: Turn) -> StreamingResponse:
    return StreamingResponse(_events(thread_id, turn.content), media_type="text/event-stream")


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
