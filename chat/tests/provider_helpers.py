"""What the provider tests (`test_openai_provider.py`, `test_anthropic_provider.py`) share:
running a fake provider server with the settings pointed at it, and driving and checking
runs over the WebSocket (`Chat`, the `chat` fixture of `chat/tests/conftest.py`)."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from channels.testing import WebsocketCommunicator
from pytest_django.fixtures import Settings

from billing.models import UsageRecord
from chat.agent.models import chat_model_preload
from chat.event_schemas import FINAL_EVENT_TYPES
from chat.models import Conversation, Message, Run
from conftest import receive_until, wait_for_runs
from tests.fakes.base import FakeLLMServer, RecordedRequest

MAX_RETRIES = 2

Fake = TypeVar("Fake", bound=FakeLLMServer)
Frames = list[dict[str, Any]]


def serve(
    fake: type[Fake], settings: Settings, provider: str, *, api_key: str, model: str
) -> Iterator[Fake]:
    """The body of an `llm` fixture: a running `fake` that the agent uses as `provider`
    ("openai" sets AGENT_OPENAI_*, ...); its script must be used up by the end."""
    with fake() as server:
        prefix = f"AGENT_{provider.upper()}"
        settings.AGENT_MODEL = provider
        setattr(settings, f"{prefix}_BASE_URL", server.base_url)
        setattr(settings, f"{prefix}_API_KEY", api_key)
        setattr(settings, f"{prefix}_MODEL", model)
        settings.AGENT_PROVIDER_MAX_RETRIES = MAX_RETRIES
        settings.AGENT_PROVIDER_TIMEOUT = 5.0
        chat_model_preload()  # as a server configured so does, outside the timed waits
        yield server
        server.assert_script_used()


@dataclass
class Chat:
    """A conversation and an open WebSocket to it, answered by the fake provider `llm`."""

    conversation: Conversation
    socket: WebsocketCommunicator
    llm: FakeLLMServer
    settings: Settings

    async def ask(self, content: str, until: str) -> Frames:
        """Send a message and collect the run's frames up to its final event, which must be
        `until` (any final event stops the wait, so a wrong outcome fails at once)."""
        await self.socket.send_json_to({"type": "message", "content": content})
        frames: Frames = []
        while not frames or frames[-1]["type"] not in FINAL_EVENT_TYPES:
            frames.append(await self.socket.receive_json_from(timeout=10))
        await wait_for_runs()
        assert frames[-1]["type"] == until, frames[-1]
        return frames

    async def fails(self, content: str, code: str) -> tuple[Frames, Run]:
        """Send a message whose run must fail with `code`, on the socket and in the database
        alike; its frames and its run."""
        frames = await self.ask(content, "run.failed")
        final = frames[-1]
        assert final["type"] == "run.failed"
        assert final["status"] == "failed"
        assert final["error"]["code"] == code
        assert final["error"]["message"]
        run = await Run.objects.aget(id=final["run"], conversation=self.conversation)
        assert run.status == Run.Status.FAILED
        assert run.error_code == code
        assert run.error_message == final["error"]["message"]
        assert run.finished_at is not None
        return frames, run

    async def times_out(self, content: str) -> tuple[Frames, Run]:
        """`fails(content, "provider_timeout")` with a provider timeout of 0.3 s, which is
        back to 5 s afterwards."""
        self.settings.AGENT_PROVIDER_TIMEOUT = 0.3
        try:
            return await self.fails(content, "provider_timeout")
        finally:
            self.settings.AGENT_PROVIDER_TIMEOUT = 5.0

    async def assert_still_usable(self) -> None:
        """After a failure the same socket and conversation answer the next message."""
        self.llm.text("Back on my feet.")
        await self.socket.send_json_to({"type": "message", "content": "Are you there?"})
        frames = await receive_until(self.socket, "run.completed")
        assert streamed_text(frames) == "Back on my feet."
        assert frames[-1]["messages"][0]["content"] == "Back on my feet."

    async def assert_partial_answer(self, frames: Frames, run: Run, text: str) -> None:
        """What the user saw of the failed run's answer, `text`, is kept with the run."""
        assert streamed_text(frames) == text
        partial = await Message.objects.aget(run=run, role=Message.Role.ASSISTANT)
        assert partial.content == text

    async def stored(self) -> list[tuple[str, str]]:
        """The conversation's messages in the database, as (role, content)."""
        messages = Message.objects.filter(conversation=self.conversation)
        return [(m.role, m.content) async for m in messages]


def of_type(frames: Frames, event_type: str) -> Frames:
    return [f for f in frames if f["type"] == event_type]


def streamed_text(frames: Frames) -> str:
    return "".join(f["text"] for f in of_type(frames, "token"))


def calculator_step(frames: Frames, tool_call_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check that the run called our calculator on 17 * 23 and answered with the result;
    the `tool.started` and `tool.finished` frames."""
    started, finished = of_type(frames, "tool.started")[0], of_type(frames, "tool.finished")[0]
    assert started["tool_call_id"] == tool_call_id
    assert started["name"] == "calculator" and started["args"] == {"expression": "17 * 23"}
    assert finished["result"] == "391" and finished["is_error"] is False
    assert streamed_text(frames) == "17 * 23 = **391**."
    return started, finished


async def rejected_step(frames: Frames, tool_call_id: str, raw: str) -> dict[str, Any]:
    """Check that a call whose arguments were unusable is shown like any tool call, with
    the arguments as the model sent them and the error it was answered with, and stored
    so; returns its stored tool record."""
    [started] = [f for f in of_type(frames, "tool.started") if f["tool_call_id"] == tool_call_id]
    [finished] = [f for f in of_type(frames, "tool.finished") if f["tool_call_id"] == tool_call_id]
    assert started["name"] == "calculator" and started["args"] == raw
    assert finished["is_error"] is True and finished["result"].startswith("Error: ")
    assert frames.index(started) < frames.index(finished)
    stored = await Message.objects.aget(role=Message.Role.TOOL, tool__tool_call_id=tool_call_id)
    assert stored.tool is not None
    assert stored.tool["args"] == raw and stored.tool["result"] == finished["result"]
    assert stored.tool["is_error"] is True
    return stored.tool


def unanswered_tool_calls(request: RecordedRequest) -> list[str]:
    """Ids of the tool calls in a request's history that have no result (real providers
    reject such a history), in OpenAI's shape and in Anthropic's."""
    calls: list[str] = []
    answered: set[str] = set()
    for message in request.messages:
        calls.extend(call["id"] for call in message.get("tool_calls") or [])
        if message.get("role") == "tool":
            answered.add(message["tool_call_id"])
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if block.get("type") == "tool_use":
                calls.append(block["id"])
            elif block.get("type") == "tool_result":
                answered.add(block["tool_use_id"])
    return [call for call in calls if call not in answered]


async def ledger_rows(chat: Chat) -> list[UsageRecord]:
    """The ledger rows of the conversation's runs, oldest first."""
    run_ids = [r.id async for r in Run.objects.filter(conversation=chat.conversation)]
    return [r async for r in UsageRecord.objects.filter(run_id__in=run_ids).order_by("created_at")]
