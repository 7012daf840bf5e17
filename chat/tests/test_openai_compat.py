"""What the OpenAI-compatible endpoint does that a real client cannot time: a client that
leaves while its run is being created (tests/test_openai_api.py drives the rest)."""

import asyncio
import threading

import pytest
from asgiref.sync import sync_to_async

from chat.openai_compat import api


async def test_a_client_that_leaves_while_its_run_is_created_still_stops_it(monkeypatch):
    created = threading.Event()
    run = object()

    def create_slowly() -> object:
        created.wait(30)
        return run

    stopped: list[object] = []
    stopping = asyncio.Event()

    def stop(run: object) -> None:
        stopped.append(run)
        stopping.set()

    monkeypatch.setattr(api, "_cancel_in_background", stop)
    request = asyncio.create_task(api._started(sync_to_async(create_slowly)()))
    await asyncio.sleep(0)  # the request is waiting for its run

    request.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await request
    assert stopped == []  # nothing to stop yet
    created.set()
    await asyncio.wait_for(stopping.wait(), timeout=30)
    assert stopped == [run]


@pytest.mark.django_db
def test_its_schema_is_its_own_and_declares_its_errors(client):
    schema = client.get("/openai/v1/openapi.json").json()
    assert sorted(schema["paths"]) == [
        "/openai/v1/chat/completions",
        "/openai/v1/models",
        "/openai/v1/models/{model_id}",
    ]
    declared = schema["paths"]["/openai/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "409", "429", "502"} <= set(declared)
    assert "/openai/v1/models" not in client.get("/api/openapi.json").json()["paths"]
