"""The runs endpoints of the JSON API, through the real ASGI application in-process
(Django's AsyncClient: the views run on the test's loop, as the executor's runs do)."""

import asyncio
import json
import uuid

import pytest
from channels.db import database_sync_to_async
from django.test import AsyncClient

from billing.budget import CONCURRENT_RUNS_RETRY_AFTER
from billing.models import ApiKey, UsageRecord
from billing.services import account_for_user, api_key_create
from chat import services
from chat.models import Run
from conftest import account_with_limits, wait_for_runs

pytestmark = pytest.mark.django_db(transaction=True)

HEADER = "X-API-Key"
LONG_STORY = "tell me a long story " * 5


class KeyClient(AsyncClient):
    """An AsyncClient that sends these headers with every request (AsyncClient's own
    `headers=` default turns them into WSGI names, which ASGI requests drop)."""

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__()
        self.always = headers

    def generic(self, method, path, *args, headers=None, **kwargs):
        return super().generic(
            method, path, *args, headers={**self.always, **(headers or {})}, **kwargs
        )


class Caller:
    """A user with an API key, and a client that sends it."""

    def __init__(self, user, key: str) -> None:
        self.user = user
        self.key = key
        self.client = KeyClient({HEADER: key})

    async def start(self, conversation, message="What is 17 * 23?", mode="wait", **headers):
        return await self.client.post(
            f"/api/v1/conversations/{conversation.id}/runs",
            {"message": message, "mode": mode},
            content_type="application/json",
            headers=headers,
        )

    async def conversation(self):
        return await database_sync_to_async(services.conversation_create)(owner=self.user)


def _caller(make_user, name="alice", scopes=("runs",)):
    user = make_user(name)
    account_with_limits(user)
    _, key = api_key_create(
        account=account_for_user(user_id=user.pk), created_by=user, name="k", scopes=scopes
    )
    return Caller(user, key)


@pytest.fixture
async def alice(make_user):
    caller = await database_sync_to_async(_caller)(make_user)
    yield caller
    await asyncio.wait_for(wait_for_runs(), timeout=30)


@pytest.fixture
async def bob(make_user):
    return await database_sync_to_async(_caller)(make_user, "bob")


async def sse_events(response) -> list[dict]:
    """The events of an SSE response (heartbeats skipped), checking id/event lines."""
    text = "".join(
        [chunk.decode() if isinstance(chunk, bytes) else chunk async for chunk in response]
    )
    return parse_sse(text)


def parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":")
        )
        if fields:
            event = json.loads(fields["data"])
            assert fields["id"] == str(event["seq"]) and fields["event"] == event["type"]
            events.append(event)
    return events


async def poll_run(caller, run_id, *, until=lambda run: run["status"] not in ("queued", "running")):
    for _ in range(600):
        response = await caller.client.get(f"/api/v1/runs/{run_id}")
        assert response.status_code == 200
        if until(response.json()):
            return response.json()
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} did not get there: {response.json()}")


async def test_wait_answers_with_the_finished_run(alice):
    conversation = await alice.conversation()
    response = await alice.start(conversation, "What is 17 * 23?", mode="wait")
    assert response.status_code == 200, response.content
    run = response.json()
    assert run["status"] == "completed" and run["conversation"] == str(conversation.id)
    assert "391" in run["answer"]
    assert next(m["role"] for m in run["messages"]) == "user"
    assert "tool" in [m["role"] for m in run["messages"]]
    assert (
        run["usage"]["total_tokens"] == run["usage"]["input_tokens"] + run["usage"]["output_tokens"]
    )
    assert run["error"] is None and run["finished_at"] is not None
    assert response["X-Agentsite-Run"] == run["id"]


async def test_wait_is_the_default_mode(alice):
    conversation = await alice.conversation()
    response = await alice.client.post(
        f"/api/v1/conversations/{conversation.id}/runs",
        {"message": "hello"},
        content_type="application/json",
    )
    assert response.status_code == 200 and response.json()["status"] == "completed"


async def test_background_answers_202_with_the_run_and_its_url_then_it_finishes(alice):
    conversation = await alice.conversation()
    response = await alice.start(conversation, "hello there", mode="background")
    assert response.status_code == 202, response.content
    run = response.json()
    assert run["status"] in ("queued", "running")
    assert response["Location"] == f"/api/v1/runs/{run['id']}"
    finished = await poll_run(alice, run["id"])
    assert finished["status"] == "completed" and finished["answer"]
    assert finished["cost_usd"] is None or isinstance(finished["cost_usd"], str)


async def test_stream_gives_every_event_in_order_ending_with_the_final_one(alice):
    conversation = await alice.conversation()
    response = await alice.start(conversation, "What is 17 * 23?", mode="stream")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    assert response["Cache-Control"] == "no-cache"
    events = await sse_events(response.streaming_content)
    types = [e["type"] for e in events]
    assert types[0] == "run.started" and types[-1] == "run.completed"
    assert "token" in types and "tool.started" in types
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["run"] for e in events} == {response["X-Agentsite-Run"]}


async def test_a_silent_stream_sends_heartbeats(alice, settings, monkeypatch):
    monkeypatch.setattr("chat.runs_api.HEARTBEAT_SECONDS", 0.05)
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.5  # silent between tokens
    conversation = await alice.conversation()
    response = await alice.start(conversation, "hi", mode="stream")
    heartbeats = 0
    async for chunk in response.streaming_content:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        if text.startswith(":"):
            heartbeats += 1
            if heartbeats == 2:
                break
    await response.streaming_content.aclose()
    assert heartbeats == 2
    await alice.client.post(f"/api/v1/runs/{response['X-Agentsite-Run']}/cancel")


@pytest.mark.parametrize("scopes", [("runs",), ("runs", "usage")])
async def test_only_a_key_with_the_usage_scope_sees_the_budget_in_events(make_user, scopes):
    """The final event's `budget` is the account's usage and limits: what the `usage`
    scope guards. A key without it gets every event but that field."""

    def caller() -> Caller:
        caller = _caller(make_user, scopes=scopes)
        account_with_limits(caller.user, tokens_per_day=1_000_000)
        return caller

    key = await database_sync_to_async(caller)()
    conversation = await key.conversation()
    streamed = await sse_events((await key.start(conversation, mode="stream")).streaming_content)
    followed = await sse_events(
        (await key.client.get(f"/api/v1/runs/{streamed[-1]['run']}/events")).streaming_content
    )
    await asyncio.wait_for(wait_for_runs(), timeout=30)

    for events in (streamed, followed):
        assert events[-1]["type"] == "run.completed"
        if "usage" in scopes:
            assert events[-1]["budget"]["left"]["tokens_today"][1] == 1_000_000
        else:
            assert not any("budget" in event for event in events)
            assert "budget" not in json.dumps(events)


async def test_events_resume_after_the_last_event_id_and_after_seq(alice):
    conversation = await alice.conversation()
    run = (await alice.start(conversation, "What is 17 * 23?")).json()
    everything = await sse_events(
        (await alice.client.get(f"/api/v1/runs/{run['id']}/events")).streaming_content
    )
    assert everything[-1]["type"] == "run.completed"
    middle = len(everything) // 2
    for request in (
        {"headers": {"Last-Event-ID": str(middle)}},
        {"data": {"after_seq": middle}},
    ):
        response = await alice.client.get(f"/api/v1/runs/{run['id']}/events", **request)
        assert await sse_events(response.streaming_content) == everything[middle:]


@pytest.mark.parametrize("bad", ["-1", "x", str(2**63), "+1", "1_0", "9" * 40])
async def test_events_refuse_a_bad_last_event_id(alice, bad):
    conversation = await alice.conversation()
    run = (await alice.start(conversation, "hi")).json()
    response = await alice.client.get(
        f"/api/v1/runs/{run['id']}/events", headers={"Last-Event-ID": bad}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_last_event_id"


async def test_cancel_stops_a_run_under_way_and_refuses_one_that_is_over(alice, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    conversation = await alice.conversation()
    run = (await alice.start(conversation, "tell me a long story " * 5, mode="background")).json()
    await poll_run(alice, run["id"], until=lambda r: r["status"] == "running")
    response = await alice.client.post(f"/api/v1/runs/{run['id']}/cancel")
    assert response.status_code == 202, response.content
    assert response.json()["id"] == run["id"]
    over = await poll_run(alice, run["id"])
    assert over["status"] == "cancelled" and over["error"]["code"] == "cancelled"
    again = await alice.client.post(f"/api/v1/runs/{run['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "no_active_run"


async def test_a_second_run_while_one_is_under_way_is_409(alice, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    conversation = await alice.conversation()
    first = (await alice.start(conversation, "tell me a long story " * 5, mode="background")).json()
    second = await alice.start(conversation, "and another", mode="background")
    assert second.status_code == 409 and second.json()["error"]["code"] == "run_active"
    await alice.client.post(f"/api/v1/runs/{first['id']}/cancel")


async def test_a_client_that_leaves_a_stream_does_not_stop_the_run(alice, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.02
    conversation = await alice.conversation()
    response = await alice.start(conversation, "tell me a story", mode="stream")
    stream = response.streaming_content
    async for chunk in stream:
        if b"event: token" in (chunk if isinstance(chunk, bytes) else chunk.encode()):
            break
    await stream.aclose()
    over = await poll_run(alice, response["X-Agentsite-Run"])
    assert over["status"] == "completed"


# --- Who may do what --------------------------------------------------------------------


async def test_another_users_run_and_conversation_are_not_found(alice, bob):
    conversation = await alice.conversation()
    run = (await alice.start(conversation, "hi")).json()
    for response in (
        await bob.client.get(f"/api/v1/runs/{run['id']}"),
        await bob.client.post(f"/api/v1/runs/{run['id']}/cancel"),
        await bob.client.get(f"/api/v1/runs/{run['id']}/events"),
        await bob.start(conversation, "hijack", mode="background"),
    ):
        assert response.status_code == 404, response.content
        assert run["id"] not in response.content.decode()
    missing = await alice.client.get(f"/api/v1/runs/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert (
        missing.json()["error"]["code"]
        == (await bob.client.get(f"/api/v1/runs/{run['id']}")).json()["error"]["code"]
    )
    assert await Run.objects.filter(conversation=conversation).acount() == 1


async def test_missing_invalid_and_unscoped_keys_are_refused(alice, make_user):
    conversation = await alice.conversation()
    run = (await alice.start(conversation, "hi")).json()
    anonymous = AsyncClient()
    invalid = KeyClient({HEADER: "ak_00000000_" + "x" * 43})
    unscoped = await database_sync_to_async(_caller)(make_user, "carol", scopes=("usage",))
    paths = [
        ("post", f"/api/v1/conversations/{conversation.id}/runs"),
        ("get", f"/api/v1/runs/{run['id']}"),
        ("post", f"/api/v1/runs/{run['id']}/cancel"),
        ("get", f"/api/v1/runs/{run['id']}/events"),
    ]
    for method, path in paths:
        kwargs = (
            {"data": {"message": "x"}, "content_type": "application/json"}
            if method == "post"
            else {}
        )
        assert (await getattr(anonymous, method)(path, **kwargs)).status_code == 401
        refused = await getattr(invalid, method)(path, **kwargs)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        forbidden = await getattr(unscoped.client, method)(path, **kwargs)
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["code"] == "insufficient_scope"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"message": "hi", "mode": "sideways"}, 422, "invalid_request"),
        ({"mode": "wait"}, 422, "invalid_request"),
        # A misspelt field is refused, not ignored (this one would have run in `wait`).
        ({"message": "hi", "mdoe": "stream"}, 422, "invalid_request"),
        ('"hi"', 422, "invalid_request"),
        ({"message": "   "}, 400, "empty_message"),
        ({"message": "x" * 100_000}, 400, "message_too_long"),
        ({"message": "nul \x00 here"}, 400, "invalid_message"),
    ],
)
async def test_bad_input_is_refused_and_starts_nothing(alice, body, status, code):
    conversation = await alice.conversation()
    response = await alice.client.post(
        f"/api/v1/conversations/{conversation.id}/runs", body, content_type="application/json"
    )
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert not await Run.objects.filter(conversation=conversation).aexists()


async def test_a_run_and_its_ledger_rows_record_the_key_that_started_it(alice):
    conversation = await alice.conversation()
    run = (await alice.start(conversation, "What is 17 * 23?")).json()
    await wait_for_runs()
    key = await ApiKey.objects.aget(created_by=alice.user)
    assert (await Run.objects.aget(id=run["id"])).api_key_id == key.id
    ledger = [r async for r in UsageRecord.objects.filter(run_id=run["id"])]
    assert ledger and {r.api_key_id for r in ledger} == {key.id}


async def test_a_session_may_start_runs_too(alice):
    conversation = await alice.conversation()
    client = AsyncClient(enforce_csrf_checks=False)
    await client.aforce_login(alice.user)
    response = await client.post(
        f"/api/v1/conversations/{conversation.id}/runs",
        {"message": "hi", "mode": "wait"},
        content_type="application/json",
    )
    assert response.status_code == 200 and response.json()["status"] == "completed"
    assert (await Run.objects.aget(id=response.json()["id"])).api_key_id is None


# --- Idempotency-Key ------------------------------------------------------------------


async def runs_and_ledger(conversation) -> tuple[int, int]:
    runs = [run.id async for run in Run.objects.filter(conversation=conversation)]
    return len(runs), await UsageRecord.objects.filter(run_id__in=runs).acount()


async def test_a_retried_background_request_gets_the_first_response_and_starts_nothing(alice):
    conversation = await alice.conversation()
    first = await alice.start(conversation, "hello", mode="background", **{"Idempotency-Key": "k1"})
    assert first.status_code == 202 and "Idempotent-Replayed" not in first
    await poll_run(alice, first.json()["id"])
    await wait_for_runs()
    before = await runs_and_ledger(conversation)
    assert before[1] > 0  # the run's LLM calls are on the ledger

    again = await alice.start(conversation, "hello", mode="background", **{"Idempotency-Key": "k1"})
    assert again.status_code == 202
    assert again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()  # the original response, queued status and all
    assert again["Location"] == first["Location"]
    await wait_for_runs()
    assert await runs_and_ledger(conversation) == before


async def test_a_retry_after_the_conversation_was_deleted_still_gets_its_stored_202(alice):
    conversation = await alice.conversation()
    key = {"Idempotency-Key": "before-delete"}
    first = await alice.start(conversation, "hello", mode="background", **key)
    assert first.status_code == 202
    await poll_run(alice, first.json()["id"])
    deleted = await alice.client.delete(f"/api/v1/conversations/{conversation.id}")
    assert deleted.status_code == 204

    again = await alice.start(conversation, "hello", mode="background", **key)
    assert again.status_code == 202, again.content
    assert again["Idempotent-Replayed"] == "true" and again.json() == first.json()
    # Without a key (or with a new one) the conversation is gone: 404, nothing created.
    fresh = await alice.start(
        conversation, "hello", mode="background", **{"Idempotency-Key": "new"}
    )
    assert fresh.status_code == 404


async def test_a_json_body_counts_by_its_content_not_its_spelling(alice):
    conversation = await alice.conversation()
    path = f"/api/v1/conversations/{conversation.id}/runs"
    key = {"Idempotency-Key": "spelling"}
    first = await alice.client.post(
        path, '{"message": "hi", "mode": "background"}', "application/json", headers=key
    )
    again = await alice.client.post(
        path, '{ "mode":"background","message":"hi" }', "application/json", headers=key
    )
    assert first.status_code == 202 and again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]


async def test_a_key_reused_for_a_different_request_is_422_and_starts_nothing(alice):
    conversation = await alice.conversation()
    other = await alice.conversation()
    key = {"Idempotency-Key": "k2"}
    first = await alice.start(conversation, "hello", mode="background", **key)
    await poll_run(alice, first.json()["id"])
    for response in (
        await alice.start(conversation, "something else", mode="background", **key),
        await alice.start(conversation, "hello", mode="wait", **key),
        await alice.start(other, "hello", mode="background", **key),
    ):
        assert response.status_code == 422, response.content
        assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert (await runs_and_ledger(conversation))[0] == 1
    assert (await runs_and_ledger(other))[0] == 0


async def test_a_retry_while_the_first_wait_is_answering_is_409_then_a_replay(alice, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.02
    conversation = await alice.conversation()
    key = {"Idempotency-Key": "k3"}
    first = asyncio.create_task(alice.start(conversation, "tell me a story", mode="wait", **key))
    run = await poll_run(
        alice,
        await _only_run_id(conversation),
        until=lambda r: r["status"] == "running",
    )
    busy = await alice.start(conversation, "tell me a story", mode="wait", **key)
    assert busy.status_code == 409
    assert busy.json()["error"]["code"] == "idempotency_in_flight"
    assert busy.json()["error"]["details"] == {"run": run["id"]}

    answered = await asyncio.wait_for(first, timeout=60)
    assert answered.status_code == 200 and answered.json()["status"] == "completed"
    replay = await alice.start(conversation, "tell me a story", mode="wait", **key)
    assert replay.status_code == 200 and replay["Idempotent-Replayed"] == "true"
    assert replay.json() == answered.json()
    assert (await runs_and_ledger(conversation))[0] == 1


async def _only_run_id(conversation) -> str:
    for _ in range(600):
        run = await Run.objects.filter(conversation=conversation).afirst()
        if run is not None:
            return str(run.id)
        await asyncio.sleep(0.02)
    raise AssertionError("no run was created")


async def test_a_wait_whose_client_left_is_replayed_from_its_run(alice, settings):
    """The request died before it stored a response (its client left mid-answer): the
    run went on, and a retry gets the finished run, not a 409 forever."""
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.02
    conversation = await alice.conversation()
    key = {"Idempotency-Key": "k4"}
    first = asyncio.create_task(alice.start(conversation, "tell me a story", mode="wait", **key))
    run_id = await _only_run_id(conversation)
    await poll_run(alice, run_id, until=lambda r: r["status"] == "running")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    finished = await poll_run(alice, run_id)
    replay = await alice.start(conversation, "tell me a story", mode="wait", **key)
    assert replay.status_code == 200 and replay["Idempotent-Replayed"] == "true"
    assert replay.json() == finished
    assert (await runs_and_ledger(conversation))[0] == 1


async def test_a_retried_stream_replays_the_same_runs_events(alice):
    conversation = await alice.conversation()
    key = {"Idempotency-Key": "k5"}
    first = await alice.start(conversation, "What is 17 * 23?", mode="stream", **key)
    events = await sse_events(first.streaming_content)
    replay = await alice.start(conversation, "What is 17 * 23?", mode="stream", **key)
    assert replay.status_code == 200 and replay["Idempotent-Replayed"] == "true"
    assert await sse_events(replay.streaming_content) == events
    assert (await runs_and_ledger(conversation))[0] == 1


@pytest.mark.parametrize("key", ["", "   ", "k" * 256])
async def test_a_blank_or_overlong_key_is_400_and_starts_nothing(alice, key):
    conversation = await alice.conversation()
    response = await alice.start(conversation, "hi", mode="background", **{"Idempotency-Key": key})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_idempotency_key"
    assert (await runs_and_ledger(conversation))[0] == 0


async def test_keys_are_each_accounts_own(alice, bob):
    key = {"Idempotency-Key": "k" * 255}
    mine = await alice.start(await alice.conversation(), "hi", mode="background", **key)
    theirs = await bob.start(await bob.conversation(), "hi", mode="background", **key)
    assert mine.status_code == theirs.status_code == 202
    assert "Idempotent-Replayed" not in theirs
    assert mine.json()["id"] != theirs.json()["id"]


async def test_a_failed_request_keeps_no_key(alice, settings):
    """Nothing was created (409 run_active): the same key later starts the run."""
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.02
    conversation = await alice.conversation()
    busy = (await alice.start(conversation, "tell me a long story", mode="background")).json()
    key = {"Idempotency-Key": "k6"}
    refused = await alice.start(conversation, "next", mode="background", **key)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "run_active"
    await alice.client.post(f"/api/v1/runs/{busy['id']}/cancel")
    await poll_run(alice, busy["id"])
    started = await alice.start(conversation, "next", mode="background", **key)
    assert started.status_code == 202 and "Idempotent-Replayed" not in started


# --- Limits and the schema ------------------------------------------------------------


async def test_over_the_request_limit_is_429_with_retry_after(alice):
    await database_sync_to_async(account_with_limits)(alice.user, requests_per_minute_per_account=1)
    conversation = await alice.conversation()
    assert (await alice.start(conversation, "hi", mode="background")).status_code == 202
    refused = await alice.start(conversation, "again", mode="background")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused["Retry-After"]) >= 1


async def test_over_the_concurrent_runs_limit_is_429(alice, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    await database_sync_to_async(account_with_limits)(alice.user, concurrent_runs=1)
    busy = (await alice.start(await alice.conversation(), LONG_STORY, mode="background")).json()
    other = await alice.conversation()
    refused = await alice.start(other, "hi", mode="background")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "concurrent_runs_limit"
    assert refused["Retry-After"] == str(CONCURRENT_RUNS_RETRY_AFTER)
    assert refused.json()["error"]["details"]["retry_after"] == CONCURRENT_RUNS_RETRY_AFTER
    assert not await Run.objects.filter(conversation=other).aexists()
    await alice.client.post(f"/api/v1/runs/{busy['id']}/cancel")


def statuses(*codes: int) -> set[str]:
    return {str(code) for code in codes}


async def test_the_schema_declares_every_status_and_the_event_stream(alice):
    schema = (await alice.client.get("/api/openapi.json")).json()
    paths = schema["paths"]
    create = paths["/api/v1/conversations/{conversation_id}/runs"]["post"]
    assert set(create["responses"]) == statuses(200, 202, 400, 401, 403, 404, 409, 413, 422, 429)
    assert "text/event-stream" in create["responses"]["200"]["content"]
    assert "application/json" in create["responses"]["200"]["content"]
    assert {p["name"] for p in create["parameters"]} >= {"Idempotency-Key"}
    events = paths["/api/v1/runs/{run_id}/events"]["get"]
    assert set(events["responses"]) == statuses(200, 400, 401, 403, 404, 422, 429)
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert {p["name"] for p in events["parameters"]} >= {"Last-Event-ID", "after_seq"}
    run = paths["/api/v1/runs/{run_id}"]["get"]
    assert set(run["responses"]) == statuses(200, 401, 403, 404, 422, 429)
    cancel = paths["/api/v1/runs/{run_id}/cancel"]["post"]
    assert set(cancel["responses"]) == statuses(202, 400, 401, 403, 404, 409, 413, 422, 429)
    assert {op["tags"][0] for op in (create, events, cancel, run)} == {"runs"}
    # The events the streams carry are in the schema, every type of them.
    # Each event (OpenAPI 3.1: the stream's schema is one event's): its data is a RunEvent.
    stream = events["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert stream["properties"]["data"]["contentSchema"] == {
        "$ref": "#/components/schemas/RunEvent"
    }
    event_types = schema["components"]["schemas"]["RunEvent"]["discriminator"]["mapping"]
    assert {"run.started", "token", "run.completed", "run.cancelled"} <= set(event_types)
    for ref in event_types.values():
        assert ref.rsplit("/", 1)[1] in schema["components"]["schemas"]


async def test_a_run_and_its_events_share_one_set_of_shapes(alice):
    components = (await alice.client.get("/api/openapi.json")).json()["components"]["schemas"]
    run = components["RunOut"]["properties"]
    assert run["messages"]["items"] == {"$ref": "#/components/schemas/MessageOut"}
    assert run["usage"] == {"$ref": "#/components/schemas/UsageData"}
    final = components["RunCompletedEvent"]["properties"]
    assert final["usage"] == run["usage"]
    assert not {"RunMessageOut", "RunUsageOut", "RunErrorOut"} & set(components)
    # A run's messages read as the conversation's do.
    conversation = await alice.conversation()
    finished = (await alice.start(conversation, "What is 17 * 23?")).json()
    page = (await alice.client.get(f"/api/v1/conversations/{conversation.id}/messages")).json()
    assert finished["messages"] == page["items"]


async def test_a_malformed_run_id_is_the_declared_422(alice):
    """Found by schemathesis: a run id that is no UUID was answered 422, undeclared."""
    for method, path in [("get", "/api/v1/runs/not-a-uuid"), ("post", "/api/v1/runs/x/cancel")]:
        response = await getattr(alice.client, method)(path)
        assert response.status_code == 422, (path, response.content)
        assert response.json()["error"]["code"] == "invalid_request"
