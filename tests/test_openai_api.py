"""The OpenAI-compatible endpoint driven by the official `openai` SDK, unmodified (only
its `base_url` and `api_key`), against a real server (the one `make run` starts) with
its own throwaway database: the agent on the built-in offline model, which really calls
its calculator; and a second server whose agent talks to a fake OpenAI provider, to see
what the model was given and how a provider failure reaches the client."""

import http.client
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ROOT, _server_env, serving
from tests.fakes.openai_server import FakeOpenAIServer

MODEL = "agentsite-offline-demo"
ASK_ARITHMETIC = [{"role": "user", "content": "What is 17 * 23?"}]
# Generous bounds on waits, only to stop a hang: the machine may be busy.
WAIT = 60.0

# Users, each with a key, and the limits of their accounts (billing.models.Account).
PREPARE = """
import json
from django.contrib.auth import get_user_model
from django.core.management import call_command
from billing.services import account_for_user, api_key_create

call_command("migrate", interactive=False, verbosity=0)
keys = {}
for name, scopes, limits in %s:
    user = get_user_model().objects.create_user(name, password="x-" + name)
    account = account_for_user(user_id=user.pk)
    account.plan = None
    for field, value in limits.items():
        setattr(account, field, value)
    account.save()
    keys[name] = api_key_create(account=account, created_by=user, name=name, scopes=scopes)[1]
print("KEYS=" + json.dumps(keys))
"""
USERS = [
    ("alice", ["runs", "traces"], {}),
    ("reader", ["traces"], {}),
    ("hasty", ["runs"], {"requests_per_minute_per_account": 1}),
    ("broke", ["runs"], {"tokens_per_day": 1}),
]


@dataclass
class Server:
    url: str
    keys: dict[str, str]
    database: Path
    log: Path

    def client(self, user: str = "alice", **options: Any) -> openai.OpenAI:
        # No retries: each test sees the first answer, and nothing runs twice.
        options.setdefault("max_retries", 0)
        return openai.OpenAI(
            base_url=self.url + "/openai/v1", api_key=self.keys[user], timeout=WAIT, **options
        )

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.database, timeout=WAIT) as connection:
            return connection.execute(sql, params).fetchall()

    def run_status(self, run_id: str) -> str:
        return str(self.query("SELECT status FROM chat_run WHERE id = ?", hex_id(run_id))[0][0])


def hex_id(id_: str) -> str:
    return id_.replace("-", "")  # how SQLite stores Django's UUIDs


def auth(server: Server, user: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {server.keys[user]}"}


def stored_answer(server: Server, run_id: str) -> str:
    """The run's answer as the JSON API gives it (RunOut.answer)."""
    rows = server.query(
        "SELECT content FROM chat_message WHERE run_id = ? AND role = 'assistant' "
        "AND NOT imported AND content != '' ORDER BY created_at, id",
        hex_id(run_id),
    )
    return "\n\n".join(content for (content,) in rows)


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def start_server(workdir: Path, **env: str) -> Iterator[Server]:
    environment = {**_server_env(workdir), **env}
    prepared = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", PREPARE % (USERS,)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        timeout=180,
    )
    output = prepared.stdout.decode()
    assert prepared.returncode == 0, output + prepared.stderr.decode()[-3000:]
    keys = json.loads(output.rsplit("KEYS=", 1)[1])
    log = workdir / "server.log"
    with serving(environment, log) as url:
        yield Server(url, keys, workdir / "db.sqlite3", log)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Slow enough that a client can leave mid-answer; a short answer takes a second.
    yield from start_server(tmp_path_factory.mktemp("openai-api"), AGENT_OFFLINE_TOKEN_DELAY="0.02")


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as llm:
        yield llm


@pytest.fixture(scope="module")
def provider_server(
    tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeOpenAIServer
) -> Iterator[Server]:
    yield from start_server(
        tmp_path_factory.mktemp("openai-api-provider"),
        AGENT_MODEL="openai",
        AGENT_OPENAI_BASE_URL=fake_llm.base_url,
        AGENT_OPENAI_API_KEY="sk-test",
        AGENT_OPENAI_MODEL="gpt-fake-mini",
        AGENT_PROVIDER_MAX_RETRIES="0",
    )


# -- answers ----------------------------------------------------------------------------


def test_models_lists_the_agents_model(server: Server) -> None:
    client = server.client()
    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "agentsite"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_an_answer_that_uses_a_tool_with_its_usage_and_its_run(server: Server) -> None:
    raw = server.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK_ARITHMETIC
    )
    completion = raw.parse()

    choice = completion.choices[0]
    # The calculator ran on the server: its result is in the answer.
    assert "**391**" in (choice.message.content or "")
    assert "calculator" in (choice.message.content or "")
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The run behind it, its trace and its conversation (new, marked as the endpoint's).
    run_id = raw.headers["x-agentsite-run"]
    assert completion.id == "chatcmpl-" + hex_id(run_id)
    # Its trace: in the API (for a key with the traces scope), and the page for a
    # signed-in browser.
    trace_url = raw.headers["x-agentsite-trace"]
    assert trace_url == f"{server.url}/api/v1/runs/{run_id}/trace"
    assert raw.headers["x-agentsite-trace-page"] == f"{server.url}/traces/{run_id}/"
    trace = httpx.get(trace_url, headers=auth(server), timeout=WAIT)
    assert trace.status_code == 200, trace.text
    assert server.run_status(run_id) == "completed"
    [(tool,)] = server.query(
        "SELECT tool FROM chat_message WHERE run_id = ? AND role = 'tool'", hex_id(run_id)
    )
    assert json.loads(tool)["result"] == "391"
    [(source, title)] = server.query(
        "SELECT source, title FROM chat_conversation WHERE id = ?",
        hex_id(raw.headers["x-agentsite-conversation"]),
    )
    assert (source, title) == ("openai", "What is 17 * 23?")
    [(traced,)] = server.query(
        "SELECT COUNT(*) FROM tracing_span WHERE trace_id = ?", hex_id(run_id)
    )
    assert traced > 1
    # Priced: a ledger row for each of its two model calls (before and after the tool),
    # each naming the key that caused it, as the run does.
    key_prefix = server.keys["alice"][: len("ak_") + 8]
    rows = server.query(
        "SELECT k.prefix FROM billing_usagerecord u JOIN billing_apikey k ON u.api_key_id = k.id "
        "WHERE u.run_id = ?",
        hex_id(run_id),
    )
    assert rows == [(key_prefix,), (key_prefix,)]
    assert server.query(
        "SELECT k.prefix FROM chat_run r JOIN billing_apikey k ON r.api_key_id = k.id "
        "WHERE r.id = ?",
        hex_id(run_id),
    ) == [(key_prefix,)]


def test_a_streamed_answer_in_chunks_with_usage_last(server: Server) -> None:
    stream = server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say something"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "offline demo model" in text and text.endswith("> Say something")
    # Token by token, as the agent wrote it.
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 10
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] == "stop" and set(finished[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_a_streamed_tool_using_answer(server: Server) -> None:
    chunks = list(
        server.client().chat.completions.create(model=MODEL, messages=ASK_ARITHMETIC, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The tool's steps are not content: only the answer that used its result is.
    assert text == "`17 * 23` = **391** (worked out with the calculator tool)."
    assert all(c.usage is None for c in chunks)


def test_the_history_sent_is_stored_with_the_run(server: Server) -> None:
    raw = server.client().chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Remember the number 42."},
            {"role": "assistant", "content": "I will remember 42."},
            {"role": "user", "content": [{"type": "text", "text": "Which number?"}]},
        ],
    )
    assert raw.parse().choices[0].finish_reason == "stop"
    run = hex_id(raw.headers["x-agentsite-run"])
    assert server.query("SELECT instructions FROM chat_run WHERE id = ?", run) == [("Be brief.",)]
    stored = server.query(
        "SELECT role, imported, content FROM chat_message WHERE run_id = ? ORDER BY id", run
    )
    assert stored[:3] == [
        ("user", 1, "Remember the number 42."),
        ("assistant", 1, "I will remember 42."),
        ("user", 0, "Which number?"),
    ]
    assert stored[3][:2] == ("assistant", 0) and len(stored) == 4
    # The runs API reads it too: its answer is what the agent wrote, not what it was sent.
    read = httpx.get(
        f"{server.url}/api/v1/runs/{raw.headers['x-agentsite-run']}",
        headers={"Authorization": f"Bearer {server.keys['alice']}"},
        timeout=WAIT,
    ).json()
    assert read["answer"] == stored[3][2] == raw.parse().choices[0].message.content
    marked = [("user", True), ("assistant", True), ("user", False), ("assistant", False)]
    assert [(m["role"], m["imported"]) for m in read["messages"]] == marked
    conversation = httpx.get(
        f"{server.url}/api/v1/conversations/{raw.headers['x-agentsite-conversation']}",
        headers={"Authorization": f"Bearer {server.keys['alice']}"},
        timeout=WAIT,
    ).json()
    assert conversation["source"] == "openai"
    assert [(m["role"], m["imported"]) for m in conversation["messages"]["items"]] == marked


def test_a_request_bound_to_a_conversation_continues_it(server: Server) -> None:
    client = server.client()
    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK_ARITHMETIC)
    conversation = first.headers["x-agentsite-conversation"]
    first_answer = first.parse().choices[0].message.content

    second = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[
            *ASK_ARITHMETIC,
            {"role": "assistant", "content": first_answer},
            {"role": "user", "content": "Thanks!"},
        ],
        extra_headers={"X-Agentsite-Conversation": conversation},
    )

    assert second.headers["x-agentsite-conversation"] == conversation
    assert "> Thanks!" in (second.parse().choices[0].message.content or "")
    # Only the new message was stored: the agent remembers the rest itself.
    stored = server.query(
        "SELECT role, imported FROM chat_message WHERE conversation_id = ? ORDER BY id",
        hex_id(conversation),
    )
    assert stored == [
        ("user", 0),
        ("tool", 0),
        ("assistant", 0),
        ("user", 0),
        ("assistant", 0),
    ]


def test_a_client_that_leaves_mid_answer_stops_the_run(server: Server) -> None:
    long_question = "Please repeat all of this back to me. " * 120
    with server.client().chat.completions.with_streaming_response.create(
        model=MODEL, messages=[{"role": "user", "content": long_question}], stream=True
    ) as response:
        run_id = response.headers["x-agentsite-run"]
        for chunk in response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                break  # an answer under way; leave

    deadline = time.monotonic() + WAIT
    while server.run_status(run_id) in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.run_status(run_id) == "cancelled"


def test_a_client_that_leaves_before_a_whole_answer_stops_the_run(server: Server) -> None:
    question = "Waiting for all of this. " * 200
    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    connection.request(
        "POST",
        "/openai/v1/chat/completions",
        body=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": question}]}),
        headers={"Authorization": f"Bearer {server.keys['alice']}"},
    )
    title = question[:60].strip()
    runs: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + WAIT
    while not runs and time.monotonic() < deadline:
        runs = server.query(
            "SELECT r.id FROM chat_run r JOIN chat_conversation c ON r.conversation_id = c.id "
            "WHERE c.title = ? AND r.status = 'running'",
            title,
        )
    [(run_id,)] = runs

    connection.close()  # before the answer: a timeout, a closed tab

    while server.run_status(run_id) == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.run_status(run_id) == "cancelled"


def test_a_conversation_still_answering_is_busy(server: Server) -> None:
    client = server.client()
    long_question = "Tell me all of this again. " * 120
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=[{"role": "user", "content": long_question}], stream=True
    ) as answering:
        conversation = answering.headers["x-agentsite-conversation"]
        with pytest.raises(openai.ConflictError) as refused:
            client.chat.completions.create(
                model=MODEL,
                messages=ASK_ARITHMETIC,
                extra_headers={"X-Agentsite-Conversation": conversation},
            )
    assert refused.value.code == "run_active"


# -- what the model is given (a fake OpenAI provider behind the agent) ------------------


def test_the_agent_is_given_the_whole_history_and_the_clients_instructions(
    provider_server: Server, fake_llm: FakeOpenAIServer
) -> None:
    fake_llm.requests.clear()
    fake_llm.text("Forty-two.")
    completion = provider_server.client().chat.completions.create(
        model="gpt-fake-mini",
        messages=[
            {"role": "system", "content": "Answer in words, not digits."},
            {"role": "user", "content": "Remember the number 42."},
            {"role": "assistant", "content": "I will remember it."},
            {"role": "user", "content": "Which number?"},
        ],
    )

    assert completion.choices[0].message.content == "Forty-two."
    [request] = fake_llm.requests
    sent = request.messages
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[0]["content"].startswith("You are Agentsite's assistant")
    assert sent[0]["content"].endswith("Answer in words, not digits.")
    assert [m["content"] for m in sent[1:]] == [
        "Remember the number 42.",
        "I will remember it.",
        "Which number?",
    ]
    fake_llm.assert_script_used()


def test_a_clients_instructions_hold_for_its_request_only(
    provider_server: Server, fake_llm: FakeOpenAIServer
) -> None:
    fake_llm.requests.clear()
    fake_llm.text("Forty-two.")
    fake_llm.text("Still 42.")
    client = provider_server.client()
    first = client.chat.completions.with_raw_response.create(
        model="gpt-fake-mini",
        messages=[
            {"role": "system", "content": "Answer in words, not digits."},
            {"role": "user", "content": "Which number?"},
        ],
    )
    conversation = first.headers["x-agentsite-conversation"]

    client.chat.completions.create(  # bound, and without a system message
        model="gpt-fake-mini",
        messages=[{"role": "user", "content": "And now?"}],
        extra_headers={"X-Agentsite-Conversation": conversation},
    )

    first_system, second_system = (r.messages[0]["content"] for r in fake_llm.requests)
    assert first_system.endswith("Answer in words, not digits.")
    assert "Answer in words" not in second_system
    fake_llm.assert_script_used()


def test_a_provider_failure_is_a_502_the_sdk_does_not_retry(
    provider_server: Server, fake_llm: FakeOpenAIServer
) -> None:
    fake_llm.requests.clear()
    fake_llm.error(500, "The fake provider broke.")
    client = provider_server.client(max_retries=2)

    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="gpt-fake-mini", messages=ASK_ARITHMETIC)

    assert failed.value.status_code == 502
    assert failed.value.code is not None and failed.value.code.startswith("provider_")
    assert failed.value.type == "server_error"
    assert failed.value.response.headers["x-should-retry"] == "false"
    # Not retried by the SDK: the agent ran once.
    assert len(fake_llm.requests) == 1
    fake_llm.assert_script_used()


def test_an_answer_in_several_messages_is_joined_as_the_runs_answer(
    provider_server: Server, fake_llm: FakeOpenAIServer
) -> None:
    client = provider_server.client()
    for stream in (False, True):
        # Text before the tool call, and the answer after it: two assistant messages.
        fake_llm.tool_call("calculator", {"expression": "17 * 23"}, text="Let me check.")
        fake_llm.text("It is 391.")
        if stream:
            with client.chat.completions.with_streaming_response.create(
                model="gpt-fake-mini", messages=ASK_ARITHMETIC, stream=True
            ) as response:
                run_id = response.headers["x-agentsite-run"]
                content = streamed_text(list(response.parse()))
        else:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-fake-mini", messages=ASK_ARITHMETIC
            )
            run_id = raw.headers["x-agentsite-run"]
            content = raw.parse().choices[0].message.content or ""

        assert content == "Let me check.\n\nIt is 391.", stream
        assert content == stored_answer(provider_server, run_id)
        fake_llm.assert_script_used()


# -- Idempotency-Key --------------------------------------------------------------------


def test_a_retry_with_the_same_idempotency_key_gets_the_same_completion(server: Server) -> None:
    client = server.client()
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK_ARITHMETIC, extra_headers=key
    )
    again = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK_ARITHMETIC, extra_headers=key
    )

    assert again.parse().model_dump() == first.parse().model_dump()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.headers["x-agentsite-run"] == first.headers["x-agentsite-run"]
    # The agent ran once.
    conversation = hex_id(first.headers["x-agentsite-conversation"])
    assert server.query(
        "SELECT COUNT(*) FROM chat_run WHERE conversation_id = ?", conversation
    ) == [(1,)]
    with pytest.raises(openai.UnprocessableEntityError) as reused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], extra_headers=key
        )
    assert reused.value.code == "idempotency_key_reused"
    assert reused.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as blank:
        client.chat.completions.create(
            model=MODEL, messages=ASK_ARITHMETIC, extra_headers={"Idempotency-Key": "k" * 256}
        )
    assert blank.value.code == "invalid_idempotency_key"


def test_with_an_idempotency_key_a_client_that_leaves_gets_the_answer_on_retry(
    server: Server,
) -> None:
    client = server.client()
    key = {"Idempotency-Key": str(uuid.uuid4())}
    messages = [{"role": "user", "content": "Please say all of this back to me. " * 80}]
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=messages, stream=True, extra_headers=key
    ) as response:
        run_id = response.headers["x-agentsite-run"]
        for chunk in response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                break  # an answer under way; leave (a timeout, a dropped connection)

    # The run goes on: the client can come back for it with the key.
    with pytest.raises(openai.ConflictError) as busy:
        client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, extra_headers=key
        )
    assert busy.value.code == "idempotency_in_flight"
    deadline = time.monotonic() + WAIT
    while server.run_status(run_id) in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.run_status(run_id) == "completed"

    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=messages, stream=True, extra_headers=key
    ) as replay:
        assert replay.headers["x-agentsite-run"] == run_id
        assert replay.headers["idempotent-replayed"] == "true"
        chunks = list(replay.parse())
    assert streamed_text(chunks) == stored_answer(server, run_id)
    assert chunks[-1].choices[0].finish_reason == "stop"


# -- errors -----------------------------------------------------------------------------


def test_a_bad_key_is_an_authentication_error(server: Server) -> None:
    bad = openai.OpenAI(base_url=server.url + "/openai/v1", api_key="sk-not-ours", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        bad.chat.completions.create(model=MODEL, messages=ASK_ARITHMETIC)
    assert refused.value.code == "invalid_api_key"
    assert refused.value.type == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_no_key_at_all_is_an_openai_shaped_401(server: Server) -> None:
    response = httpx.post(server.url + "/openai/v1/chat/completions", json={}, timeout=WAIT)
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("body", "status"), [(b"{not json", 400), (b'{"messages": "' + b"x" * 3_000_000 + b'"}', 413)]
)
def test_a_body_that_is_not_json_or_too_large_is_refused_openais_way(
    server: Server, body: bytes, status: int
) -> None:
    response = httpx.post(
        server.url + "/openai/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {server.keys['alice']}"},
        timeout=WAIT,
    )
    assert response.status_code == status
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_path_that_is_no_endpoint_is_an_openai_shaped_404(server: Server) -> None:
    response = httpx.get(server.url + "/openai/v1/completions", timeout=WAIT)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


def test_a_method_an_endpoint_does_not_allow_is_an_openai_shaped_405(server: Server) -> None:
    response = httpx.get(
        server.url + "/openai/v1/chat/completions", headers=auth(server), timeout=WAIT
    )
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("method_not_allowed", "invalid_request_error")


def test_a_key_without_the_runs_scope_is_refused(server: Server) -> None:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        server.client("reader").chat.completions.create(model=MODEL, messages=ASK_ARITHMETIC)
    assert refused.value.code == "insufficient_scope"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "tool", "content": "42", "tool_call_id": "call_1"}], "messages[0].role"),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ],
            "messages",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0]",
        ),
        ([{"role": "user", "content": "x" * 9000}], "messages[0].content"),
        (
            [
                {"role": "user", "content": "x" * 9000},
                {"role": "assistant", "content": "Too long."},
                {"role": "user", "content": "Sorry."},
            ],
            "messages[0].content",
        ),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "system", "content": "x" * 9000},
                {"role": "user", "content": "Hi?"},
            ],
            "messages[1].content",
        ),
        ([{"role": "user", "content": "  "}], "messages[0].content"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"content": "Hi"}], "messages[0].role"),
        ([], "messages"),
    ],
)
def test_bad_requests_are_refused_with_the_param_at_fault(
    server: Server, messages: list[dict[str, Any]], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    assert refused.value.param == param
    assert refused.value.type == "invalid_request_error"


def test_client_tools_are_refused(server: Server) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().chat.completions.create(
            model=MODEL,
            messages=ASK_ARITHMETIC,
            tools=[tool],  # type: ignore[list-item]
        )
    assert refused.value.param == "tools"


def test_an_unknown_model_or_conversation_is_not_found(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=ASK_ARITHMETIC)
    assert (refused.value.code, refused.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK_ARITHMETIC,
            extra_headers={"X-Agentsite-Conversation": "0f6fbd8c-5d86-4f43-9ad4-d5e7dce0a3c1"},
        )
    assert refused.value.code == "conversation_not_found"


def test_over_the_rate_limit_is_a_rate_limit_error_with_retry_after(server: Server) -> None:
    client = server.client("hasty")
    client.models.list()  # the one request a minute this account may make
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=ASK_ARITHMETIC)
    assert refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.response.headers["retry-after"]) >= 1


def test_over_budget_is_a_rate_limit_error_the_sdk_does_not_retry(server: Server) -> None:
    client = server.client("broke", max_retries=2)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=ASK_ARITHMETIC)
    assert refused.value.code == "insufficient_quota"
    assert refused.value.type == "insufficient_quota"
    headers = refused.value.response.headers
    # Its daily tokens are spent: come back tomorrow (UTC), not in a second.
    assert int(headers["retry-after"]) >= 1 and headers["x-should-retry"] == "false"
    run_id = headers["x-agentsite-run"]
    assert server.run_status(run_id) == "budget_exceeded"


def test_over_budget_mid_stream_is_an_error_the_sdk_raises(server: Server) -> None:
    stream = server.client("broke").chat.completions.create(
        model=MODEL, messages=ASK_ARITHMETIC, stream=True
    )
    with pytest.raises(openai.APIError) as failed:
        list(stream)
    assert failed.value.code == "insufficient_quota"
