"""What the OpenAI-compatible endpoint does that a real client cannot time: a client that
leaves while its run is being created, a conversation deleted while it answers
(tests/test_openai_api.py drives the rest with the openai SDK against a real server)."""

import asyncio
import json
import threading
from collections.abc import AsyncIterator

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.test import AsyncClient

from billing.services import account_for_user, api_key_create
from chat import services
from chat.events import Frame, follow
from chat.models import Conversation, Run
from chat.openai_compat import api, wire
from conftest import wait_for_runs


@pytest.mark.parametrize("abandon", [True, False])
async def test_a_client_that_leaves_while_its_run_is_created_still_stops_it(monkeypatch, abandon):
    created = threading.Event()
    run = Run()

    def create_slowly() -> services.RunSubmitted:
        created.wait(30)
        return services.RunSubmitted(run=run)

    stopped: list[object] = []
    stopping = asyncio.Event()

    def stop(*, run_id: object) -> None:
        stopped.append(run_id)
        stopping.set()

    monkeypatch.setattr(services, "run_abandon_in_background", stop)
    request = asyncio.create_task(api._started(sync_to_async(create_slowly)(), abandon=abandon))
    await asyncio.sleep(0)  # the request is waiting for its run

    request.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await request
    assert stopped == []  # nothing to stop yet
    created.set()
    if abandon:
        await asyncio.wait_for(stopping.wait(), timeout=30)
        assert stopped == [run.id]
    else:  # it sent an Idempotency-Key: it may come back for the answer
        await asyncio.sleep(0.1)
        assert stopped == []


@pytest.mark.django_db
def test_its_schema_is_its_own_and_declares_its_errors(client):
    schema = client.get("/openai/v1/openapi.json").json()
    assert sorted(schema["paths"]) == [
        "/openai/v1/chat/completions",
        "/openai/v1/models",
        "/openai/v1/models/{model_id}",
    ]
    operation = schema["paths"]["/openai/v1/chat/completions"]["post"]
    assert {"400", "401", "404", "405", "409", "422", "429", "502"} <= set(operation["responses"])
    assert "Idempotency-Key" in [parameter["name"] for parameter in operation["parameters"]]
    assert "/openai/v1/models" not in client.get("/api/openapi.json").json()["paths"]


@pytest.mark.django_db(transaction=True)
async def test_a_conversation_deleted_while_it_answers_ends_the_request_as_a_cancel(
    make_user, settings, monkeypatch
):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05  # an answer of seconds
    user = await database_sync_to_async(make_user)()
    account = await database_sync_to_async(account_for_user)(user_id=user.pk)
    _, key = await database_sync_to_async(api_key_create)(
        account=account, created_by=user, name="k", scopes=["runs"]
    )
    runs: list[Run] = []
    started = threading.Event()
    run_start = api._run_start

    def recorded(**kwargs: object) -> services.RunSubmitted:
        submitted = run_start(**kwargs)  # type: ignore[arg-type]
        assert submitted.run is not None
        runs.append(submitted.run)
        started.set()
        return submitted

    monkeypatch.setattr(api, "_run_start", recorded)
    asking = asyncio.create_task(
        AsyncClient().post(
            "/openai/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Tell me everything. " * 20}]},
            content_type="application/json",
            headers={"Authorization": f"Bearer {key}"},
        )
    )
    assert await asyncio.to_thread(started.wait, 30)
    async for frame in follow(runs[0].id):
        if frame is not None and frame.type == "token":
            break  # it is answering
    conversation = await Conversation.objects.aget(owner=user)

    await database_sync_to_async(services.conversation_delete)(conversation=conversation)

    response = await asyncio.wait_for(asking, timeout=30)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "cancelled"
    await asyncio.wait_for(wait_for_runs(), timeout=30)


async def test_events_that_end_without_a_final_one_mean_the_run_is_gone(monkeypatch):
    async def follow_a_deleted_run(run_id: object, **options: object) -> AsyncIterator[Frame]:
        yield Frame(1, "token", json.dumps({"type": "token", "seq": 1, "text": "Hel"}))

    stopped: list[object] = []
    monkeypatch.setattr(api, "follow", follow_a_deleted_run)
    monkeypatch.setattr(
        services, "run_abandon_in_background", lambda *, run_id: stopped.append(run_id)
    )

    with pytest.raises(wire.OpenAIError) as gone:
        await api._final(Run(), abandon=True)
    assert (gone.value.status, gone.value.code) == (404, "conversation_not_found")
    assert stopped == []  # nothing left to stop


@pytest.mark.django_db(transaction=True)
async def test_a_stream_silent_for_a_while_carries_keep_alives(make_user, settings, monkeypatch):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    monkeypatch.setattr(api, "HEARTBEAT_SECONDS", 0.01)  # much shorter than between two tokens
    user = await database_sync_to_async(make_user)()
    account = await database_sync_to_async(account_for_user)(user_id=user.pk)
    _, key = await database_sync_to_async(api_key_create)(
        account=account, created_by=user, name="k", scopes=["runs"]
    )
    response = await AsyncClient().post(
        "/openai/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hello"}], "stream": True},
        content_type="application/json",
        headers={"Authorization": f"Bearer {key}"},
    )
    body = "".join([part.decode() async for part in response.streaming_content])

    assert response["Content-Type"].startswith("text/event-stream")
    assert ": keep-alive\n\n" in body
    messages = [m for m in body.split("\n\n") if m.startswith("data: ")]
    assert messages[-1] == "data: [DONE]"
    text = "".join(
        json.loads(m[len("data: ") :])["choices"][0]["delta"].get("content") or ""
        for m in messages[:-1]
    )
    assert text.endswith("> Hello")
    await asyncio.wait_for(wait_for_runs(), timeout=30)


async def test_a_replayed_stream_whose_tokens_expired_sends_the_answer_whole(monkeypatch):
    final = {
        "type": "run.completed",
        "seq": 1,
        "status": "completed",
        "messages": [{"id": 1, "content": "Let me check."}, {"id": 2, "content": "It is 391."}],
        "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
    }

    async def follow_an_expired_log(run_id: object, **options: object) -> AsyncIterator[Frame]:
        # What `follow` gives once the log is gone: the final event, rebuilt.
        yield Frame(1, "run.completed", json.dumps(final))

    monkeypatch.setattr(api, "follow", follow_an_expired_log)
    run = Run()
    chunks = wire.Chunks(run_id=run.id, created=0, model="m", include_usage=False)

    sent = [message async for message in api._stream(run, chunks, abandon=False)]

    assert sent[-1] == wire.DONE
    deltas = [json.loads(m[len("data: ") :])["choices"][0]["delta"] for m in sent[:-1]]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check.\n\nIt is 391."


@pytest.mark.django_db
def test_abandoning_a_run_that_is_over_or_gone_does_nothing(make_user):
    conversation = services.conversation_create(owner=make_user())
    over = Run.objects.create(conversation=conversation, model="m", status=Run.Status.COMPLETED)

    services.run_abandon(run_id=over.id)
    over.refresh_from_db()
    assert over.status == Run.Status.COMPLETED
    services.conversation_delete(conversation=conversation)
    services.run_abandon(run_id=over.id)  # went with its conversation: nothing to stop


@pytest.mark.parametrize(
    ("redone", "received"),
    [
        # The resumed run streams the cut step again as it was: nothing is sent twice.
        (["Hel", "lo", ", it is 391."], "Let me check.\n\nHello, it is 391."),
        # It streams something else (a real model): the new text in a new paragraph.
        (["It", " is 391."], "Let me check.\n\nHel\n\nIt is 391."),
    ],
)
async def test_a_stream_of_a_resumed_run_sends_the_cut_steps_text_once(
    monkeypatch, redone, received
):
    events = [
        {"type": "token", "text": "Let me check."},
        {"type": "tool.started"},
        {"type": "tool.finished"},
        {"type": "token", "text": "Hel"},  # its process died here
        {"type": "run.resumed", "recoveries": 1},
        *({"type": "token", "text": text} for text in redone),
        {
            "type": "run.completed",
            "status": "completed",
            "messages": [],
            "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
        },
    ]

    async def follow_a_resumed_run(run_id: object, **options: object) -> AsyncIterator[Frame]:
        for seq, event in enumerate(events, start=1):
            yield Frame(seq, event["type"], json.dumps({**event, "seq": seq}))

    monkeypatch.setattr(api, "follow", follow_a_resumed_run)
    run = Run()
    chunks = wire.Chunks(run_id=run.id, created=0, model="m", include_usage=False)

    sent = [message async for message in api._stream(run, chunks, abandon=False)]

    deltas = [json.loads(m[len("data: ") :])["choices"][0]["delta"] for m in sent[:-1]]
    assert "".join(d.get("content") or "" for d in deltas) == received
