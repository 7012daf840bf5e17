"""Every event real runs log fits `RunEvent` exactly: no field the schemas do not
document, none of the wrong type, and no browser rendering (HTML, display strings)."""

import json
import uuid

import pytest
from channels.db import database_sync_to_async
from pydantic import ValidationError

from chat import lifecycle, services
from chat.event_schemas import FINAL_EVENT_TYPES, run_event_adapter
from chat.events import RunEventStream, event_log
from chat.models import Run
from chat.tests.provider_helpers import serve
from conftest import account_with_limits, open_socket, receive_until, wait_for_runs
from tests.fakes.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.django_db(transaction=True)


async def logged_types(run_id: str) -> list[str]:
    """The types of the run's logged events, each validated against `RunEvent`."""
    frames = await event_log().after(uuid.UUID(run_id), 0)
    assert frames and [frame.seq for frame in frames] == list(range(1, len(frames) + 1))
    for frame in frames:
        event = run_event_adapter.validate_json(frame.text, strict=True)
        assert event.type == frame.type
    return [frame.type for frame in frames]


async def test_the_events_of_real_runs_fit_their_schemas(make_user, settings):
    user = await database_sync_to_async(make_user)()
    await database_sync_to_async(account_with_limits)(user, tokens_per_day=1_000_000)
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    seen: list[str] = []

    await socket.send_json_to({"type": "message", "content": "What is 17 * 23?"})
    run = (await receive_until(socket, "run.completed"))[-1]["run"]
    seen += await logged_types(run)
    assert {"run.started", "tool.started", "tool.finished", "token", "usage"} <= set(seen)

    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    await socket.send_json_to({"type": "message", "content": "Tell me something long"})
    await receive_until(socket, "token")
    await socket.send_json_to({"type": "cancel"})
    run = (await receive_until(socket, "run.cancelled"))[-1]["run"]
    seen += await logged_types(run)

    settings.AGENT_OFFLINE_TOKEN_DELAY = 0
    settings.AGENT_MAX_STEPS = 1
    await socket.send_json_to({"type": "message", "content": "What is 2 + 2?"})
    run = (await receive_until(socket, "run.limit_reached"))[-1]["run"]
    seen += await logged_types(run)
    await wait_for_runs()
    await socket.disconnect()

    assert {"run.completed", "run.cancelled", "run.limit_reached"} <= set(seen)


@pytest.fixture
def llm(settings):
    yield from serve(FakeOpenAIServer, settings, "openai", api_key="sk-test", model="gpt-fake")


async def test_the_events_of_a_failed_run_fit_their_schemas(llm, chat):
    llm.error(400, "Nope, says the provider.")

    frames, _ = await chat.fails("Hello?", "provider_bad_request")

    assert (await logged_types(frames[-1]["run"]))[-1] == "run.failed"


async def test_the_final_event_of_an_interrupted_run_fits_its_schema(make_user):
    def interrupted() -> str:
        conversation = services.conversation_create(owner=make_user())
        run = Run.objects.create(
            conversation=conversation, model="offline", status=Run.Status.RUNNING
        )
        closed = lifecycle.run_close(run_id=run.id, lapsed_only=False)
        assert closed is not None
        return json.dumps(closed.final)

    event = run_event_adapter.validate_json(await database_sync_to_async(interrupted)())
    assert event.type == "run.interrupted"


@pytest.mark.parametrize(
    "change",
    [
        {"html": "<p>Hi</p>"},  # a field the schema does not document
        {"text": 7},  # the wrong type
        {"type": "token.rendered"},  # no such event
    ],
)
def test_an_event_off_its_schema_is_refused(change):
    event = {"type": "token", "run": str(uuid.uuid4()), "seq": 1, "text": "Hi", **change}

    with pytest.raises(ValidationError):
        run_event_adapter.validate_json(json.dumps(event), strict=True)


async def test_an_emitter_that_drifts_from_the_schema_fails_in_the_tests(settings):
    """AGENT_CHECK_EVENTS (on in the tests): every event a run publishes is held to its
    schema, so an emitter that adds, drops or mistypes a field fails where it emits."""
    assert settings.AGENT_CHECK_EVENTS
    stream = RunEventStream(uuid.uuid4(), uuid.uuid4())

    usage = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}

    await stream.emit("usage", **usage)
    with pytest.raises(ValidationError):
        await stream.emit("usage", **usage, cost="$0.01")
    with pytest.raises(ValidationError):
        await stream.emit("usage", **{**usage, "total_tokens": "2"})

    settings.AGENT_CHECK_EVENTS = False  # production: published as built
    await stream.emit("usage", **usage, cost="$0.01")


def test_the_final_event_types_are_the_runs_final_statuses():
    assert set(lifecycle.FINAL_EVENTS.values()) == FINAL_EVENT_TYPES
