"""The conversation endpoints of the JSON API: /api/v1/conversations…"""

import json
import secrets
import uuid
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.services import account_for_user, api_key_create, api_key_revoke
from chat import services
from chat.models import Conversation, Message, Run
from conftest import account_with_limits

pytestmark = pytest.mark.django_db

HEADER = "X-API-Key"
BASE = "/api/v1/conversations"
# Run-once per example: the database fixture is shared by every example of a test.
EXAMPLES = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# Every code point, surrogates and NUL included (JSON carries them escaped).
any_text = st.text(st.characters(exclude_categories=()), max_size=300) | st.sampled_from(
    ["", " ", "\x00", "\ud800", "a\udfffb", "x" * 200, "x" * 201, " x " * 150, "\u2028"]
)


def session(user, *, enforce_csrf=False):
    client = Client(enforce_csrf_checks=enforce_csrf)
    client.force_login(user)
    return client


def make_key(user, scopes=("runs",)):
    _, raw_key = api_key_create(
        account=account_for_user(user_id=user.id), created_by=user, name="k", scopes=scopes
    )
    return raw_key


def with_key(raw_key):
    # Enforcing CSRF, as a real server does: a program has a key and no CSRF token.
    return Client(enforce_csrf_checks=True, headers={HEADER: raw_key})


def send(client, method, path, body=None):
    return getattr(client, method)(
        path, data=json.dumps(body) if body is not None else None, content_type="application/json"
    )


@pytest.fixture
def alice(make_user):
    user = make_user("alice")
    # No requests-per-minute limit: the generated examples are many.
    account_with_limits(user, requests_per_minute_per_account=100_000)
    return user


# --- Create, read, rename, delete ------------------------------------------------------


def test_create_without_a_title_gives_the_placeholder_and_with_one_cleans_it(alice):
    client = session(alice)
    plain = send(client, "post", BASE, {})
    assert plain.status_code == 201, plain.content
    body = plain.json()
    assert body["title"] == "New conversation" and body["source"] == "api"
    assert set(body) == {"id", "title", "source", "created_at", "updated_at"}
    titled = send(client, "post", BASE, {"title": "  Plans   for\tMay "})
    assert titled.status_code == 201 and titled.json()["title"] == "Plans for May"
    assert Conversation.objects.filter(owner=alice).count() == 2


def test_a_key_creates_conversations_without_a_csrf_token(alice):
    """A program sends a key and no CSRF token: the session check must not refuse it."""
    response = send(with_key(make_key(alice)), "post", BASE, {"title": "From a program"})
    assert response.status_code == 201, response.content
    assert Conversation.objects.get(id=response.json()["id"]).owner == alice


def test_a_session_needs_its_csrf_token_for_unsafe_methods(alice):
    client = session(alice, enforce_csrf=True)
    refused = send(client, "post", BASE, {})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "csrf_failed"
    assert client.get(BASE).status_code == 200
    token = secrets.token_hex(16)  # as the chat page sets it, in cookie and page
    client.cookies["csrftoken"] = token
    response = client.post(
        BASE, "{}", content_type="application/json", headers={"X-CSRFToken": token}
    )
    assert response.status_code == 201, response.content


def test_a_body_over_the_limit_is_413_as_the_schema_declares(alice, settings):
    settings.AGENT_API_MAX_BODY_BYTES = 1000
    client = session(alice)
    conversation = services.conversation_create(owner=alice)
    paths = Client().get("/api/openapi.json").json()["paths"]
    for method, path, template in [
        ("post", BASE, BASE),
        ("patch", f"{BASE}/{conversation.id}", BASE + "/{conversation_id}"),
    ]:
        response = send(client, method, path, {"title": "x" * 2000})
        assert response.status_code == 413, (method, response.content)
        assert response.json()["error"]["code"] == "request_too_large"
        assert "413" in paths[template][method]["responses"], template


def test_a_form_body_without_its_boundary_is_a_400_not_a_500(alice):
    """The session's CSRF check reads the form for its token, and Django cannot read a
    multipart body whose Content-Type names no boundary (found by schemathesis)."""
    client = session(alice, enforce_csrf=True)
    client.cookies["csrftoken"] = token = secrets.token_hex(16)
    response = client.post(
        BASE, "{}", content_type="multipart/form-data", headers={"X-CSRFToken": token}
    )
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "bad_request"
    assert not Conversation.objects.exists()


def test_get_returns_the_conversation_with_its_first_page_of_messages(alice):
    conversation = services.conversation_create(owner=alice, title="Weather")
    run = Run.objects.create(conversation=conversation, model="m", status=Run.Status.COMPLETED)
    Message.objects.create(conversation=conversation, run=run, role="user", content="Rain?")
    tool = {
        "tool_call_id": "c1",
        "name": "weather",
        "args": {"city": "Oslo"},
        "result": "rain",
        "is_error": False,
    }
    Message.objects.create(conversation=conversation, run=run, role="tool", tool=tool)
    Message.objects.create(conversation=conversation, run=run, role="assistant", content="Yes.")
    response = session(alice).get(f"{BASE}/{conversation.id}")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == str(conversation.id) and body["title"] == "Weather"
    messages = body["messages"]
    assert messages["next_cursor"] is None
    assert [(m["role"], m["content"]) for m in messages["items"]] == [
        ("user", "Rain?"),
        ("tool", ""),
        ("assistant", "Yes."),
    ]
    assert messages["items"][1]["tool"] == tool
    assert messages["items"][0]["tool"] is None
    assert {m["run_id"] for m in messages["items"]} == {str(run.id)}
    assert set(messages["items"][0]) == {
        "id",
        "role",
        "content",
        "tool",
        "run_id",
        "imported",
        "created_at",
    }


def test_messages_page_oldest_first_and_the_detail_hands_over_to_them(alice):
    conversation = services.conversation_create(owner=alice)
    Message.objects.bulk_create(
        Message(conversation=conversation, role="user", content=f"m{i}") for i in range(45)
    )
    client = session(alice)
    detail = client.get(f"{BASE}/{conversation.id}").json()["messages"]
    seen = [m["content"] for m in detail["items"]]
    assert len(seen) == 20
    cursor = detail["next_cursor"]
    while cursor:
        page = client.get(
            f"{BASE}/{conversation.id}/messages", {"cursor": cursor, "limit": 7}
        ).json()
        seen += [m["content"] for m in page["items"]]
        cursor = page["next_cursor"]
    assert seen == [f"m{i}" for i in range(45)]


def test_rename_cleans_the_title_and_refuses_a_bad_one_with_its_code(alice):
    conversation = services.conversation_create(owner=alice)
    client = session(alice)
    response = send(client, "patch", f"{BASE}/{conversation.id}", {"title": " New\n name "})
    assert response.status_code == 200 and response.json()["title"] == "New name"
    for bad in ("", "   ", "x" * 201, "nul\x00", "lone \ud800"):
        refused = send(client, "patch", f"{BASE}/{conversation.id}", {"title": bad})
        assert refused.status_code == 400, bad
        assert refused.json()["error"]["code"] == "invalid_title"
    missing = send(client, "patch", f"{BASE}/{conversation.id}", {})
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "invalid_request"
    conversation.refresh_from_db()
    assert conversation.title == "New name"


@pytest.mark.parametrize(
    "raw, status",
    [
        ('"x"', 422),  # once read by attribute: a conversation titled "X" (str.title)
        ("[null, null]", 422),
        ("5", 422),
        ("null", 422),
        ('{"titel": "typo"}', 422),
        ("not json", 400),
    ],
)
def test_a_body_that_is_not_the_declared_object_is_refused(alice, raw, status):
    response = session(alice).post(BASE, raw, content_type="application/json")
    assert response.status_code == status, response.content
    assert set(response.json()["error"]) >= {"code", "message"}
    assert not Conversation.objects.exists()


@given(title=any_text)
@EXAMPLES
def test_any_title_is_either_stored_cleaned_or_refused_with_invalid_title(alice, title):
    client = session(alice)
    conversation = services.conversation_create(owner=alice, title="Before")
    for response in (
        send(client, "post", BASE, {"title": title}),
        send(client, "patch", f"{BASE}/{conversation.id}", {"title": title}),
    ):
        cleaned = " ".join(title.split())
        if response.status_code in (200, 201):
            assert response.json()["title"] == cleaned
        else:
            assert response.status_code == 400, (title, response.content)
            assert response.json()["error"]["code"] == "invalid_title"


def test_delete_stops_the_active_run_and_forgets_the_agents_memory(
    alice, monkeypatch, django_capture_on_commit_callbacks
):
    stopped = []
    monkeypatch.setattr(
        services, "_stop_and_forget", lambda runs, thread: stopped.append((runs, thread))
    )
    conversation = services.conversation_create(owner=alice)
    run = Run.objects.create(conversation=conversation, model="m", status=Run.Status.RUNNING)
    client = session(alice)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.delete(f"{BASE}/{conversation.id}")
    assert response.status_code == 204 and response.content == b""
    assert stopped == [([run.id], str(conversation.id))]
    assert not Conversation.objects.filter(id=conversation.id).exists()
    assert client.delete(f"{BASE}/{conversation.id}").status_code == 404


def test_a_retry_with_the_same_idempotency_key_creates_one_conversation(alice, make_user):
    client = session(alice)

    def create(body, key):
        return client.post(
            BASE,
            json.dumps(body),
            content_type="application/json",
            headers={"Idempotency-Key": key},
        )

    first = create({"title": "Once"}, "k1")
    assert first.status_code == 201 and "Idempotent-Replayed" not in first
    again = create({"title": "Once"}, "k1")
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert Conversation.objects.filter(owner=alice).count() == 1
    other = create({"title": "Another"}, "k1")
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    # No key: each request creates; another account's same key is its own.
    send(client, "post", BASE, {"title": "Once"})
    assert Conversation.objects.filter(owner=alice).count() == 2
    bob = make_user("bob")
    theirs = session(bob).post(
        BASE,
        json.dumps({"title": "Once"}),
        content_type="application/json",
        headers={"Idempotency-Key": "k1"},
    )
    assert theirs.status_code == 201 and "Idempotent-Replayed" not in theirs
    assert Conversation.objects.filter(owner=bob).count() == 1
    blank = create({"title": "Once"}, " ")
    assert blank.status_code == 400 and blank.json()["error"]["code"] == "invalid_idempotency_key"


# --- Listing and cursors -----------------------------------------------------------------


def walk(client, limit):
    seen, cursor = [], None
    while True:
        params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        response = client.get(BASE, params)
        assert response.status_code == 200, response.content
        page = response.json()
        assert len(page["items"]) <= limit
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


def test_the_list_is_newest_first_complete_and_only_the_callers(alice, make_user):
    conversations = [services.conversation_create(owner=alice, title=f"c{i}") for i in range(7)]
    now = timezone.now()
    for i, conversation in enumerate(conversations):
        Conversation.objects.filter(id=conversation.id).update(
            created_at=now + timedelta(seconds=i)
        )
    services.conversation_create(owner=make_user("bob"), title="Bob's")
    newest_first = [str(c.id) for c in reversed(conversations)]
    client = session(alice)
    for limit in (1, 2, 3, 7, 100):
        assert walk(client, limit) == newest_first
    assert client.get(BASE, {"limit": 7}).json()["next_cursor"] is None
    # An empty cursor is no cursor: the first page.
    first_page = client.get(BASE, {"cursor": ""}).json()["items"]
    assert [item["id"] for item in first_page] == newest_first


def test_conversations_created_at_the_same_instant_are_neither_lost_nor_repeated(alice):
    conversations = [services.conversation_create(owner=alice) for _ in range(9)]
    Conversation.objects.filter(owner=alice).update(created_at=timezone.now())
    # Ties are broken by id, descending.
    assert walk(session(alice), 2) == sorted((str(c.id) for c in conversations), reverse=True)


def test_a_conversation_that_gets_a_message_keeps_its_place_while_paging(alice):
    conversations = [services.conversation_create(owner=alice) for _ in range(4)]
    client = session(alice)
    first = client.get(BASE, {"limit": 2}).json()
    # The oldest gets a message between two pages: its updated_at moves, its place not.
    Conversation.objects.filter(id=conversations[0].id).update(updated_at=timezone.now())
    second = client.get(BASE, {"limit": 2, "cursor": first["next_cursor"]}).json()
    ids = [item["id"] for item in first["items"] + second["items"]]
    assert sorted(ids) == sorted(str(c.id) for c in conversations) and len(set(ids)) == 4


def test_a_cursor_is_refused_when_altered_or_issued_by_another_list(alice):
    for _ in range(3):
        services.conversation_create(owner=alice)
    client = session(alice)
    cursor = client.get(BASE, {"limit": 1}).json()["next_cursor"]
    other = services.conversation_create(owner=alice)
    Message.objects.bulk_create(
        Message(conversation=other, role="user", content="x") for _ in range(3)
    )
    messages_cursor = client.get(f"{BASE}/{other.id}/messages", {"limit": 1}).json()["next_cursor"]
    elsewhere = services.conversation_create(owner=alice)
    flipped = cursor[:-1] + ("A" if cursor[-1] != "A" else "B")
    for path, bad in [
        (BASE, flipped),
        (BASE, "not-a-cursor"),
        (BASE, messages_cursor),  # another list's
        (f"{BASE}/{elsewhere.id}/messages", messages_cursor),  # another conversation's
        (f"{BASE}/{other.id}/messages", cursor),
    ]:
        response = client.get(path, {"cursor": bad})
        assert response.status_code == 400, (path, bad)
        assert response.json()["error"]["code"] == "invalid_cursor"


# What a URL can carry: any code point but a surrogate, which has no UTF-8 form.
@given(cursor=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=300))
@EXAMPLES
def test_any_made_up_cursor_is_a_400_never_a_500(alice, cursor):
    client = session(alice)
    conversation = services.conversation_create(owner=alice)
    for path in (BASE, f"{BASE}/{conversation.id}/messages"):
        response = client.get(path, {"cursor": cursor})
        assert response.status_code in (400, 422), response.content
        assert response.json()["error"]["code"] in ("invalid_cursor", "invalid_request")


def test_the_page_size_is_bounded(alice):
    client = session(alice)
    for limit in (0, -1, 101, "many"):
        response = client.get(BASE, {"limit": limit})
        assert response.status_code == 422, limit
        assert response.json()["error"]["code"] == "invalid_request"


# --- Who may --------------------------------------------------------------------------


def every_call(conversation_id):
    path = f"{BASE}/{conversation_id}"
    return [
        ("post", BASE, {}),
        ("get", BASE, None),
        ("get", path, None),
        ("get", f"{path}/messages", None),
        ("patch", path, {"title": "x"}),
        ("delete", path, None),
    ]


def test_no_credentials_a_bad_key_and_a_revoked_key_are_401(alice):
    conversation = services.conversation_create(owner=alice)
    raw_key = make_key(alice)
    revoked_key = make_key(alice)
    api_key_revoke(api_key=alice.api_keys.get(prefix=revoked_key[:11]))
    for method, path, body in every_call(conversation.id):
        anonymous = send(Client(enforce_csrf_checks=True), method, path, body)
        assert anonymous.status_code == 401, (method, path)
        assert anonymous.json()["error"]["code"] == "unauthenticated"
        for bad, code in [
            (raw_key[:-2] + "xx", "invalid_api_key"),
            ("nonsense", "invalid_api_key"),
            (revoked_key, "api_key_revoked"),
        ]:
            refused = send(with_key(bad), method, path, body)
            assert refused.status_code == 401, (method, path, bad)
            assert refused.json()["error"]["code"] == code
    assert Conversation.objects.filter(owner=alice).get() == conversation


def test_a_key_without_the_runs_scope_is_403(alice):
    conversation = services.conversation_create(owner=alice)
    traces_only = with_key(make_key(alice, scopes=("traces", "usage")))
    for method, path, body in every_call(conversation.id):
        response = send(traces_only, method, path, body)
        assert response.status_code == 403, (method, path)
        assert response.json()["error"]["code"] == "insufficient_scope"
    assert Conversation.objects.filter(owner=alice).get() == conversation


@pytest.mark.parametrize("by", ["session", "key"])
def test_another_users_conversation_is_not_found_exactly_like_a_missing_one(alice, make_user, by):
    conversation = services.conversation_create(owner=alice, title="Alice's secrets")
    Message.objects.create(conversation=conversation, role="user", content="secret")
    mallory = make_user("mallory")
    client = session(mallory) if by == "session" else with_key(make_key(mallory))
    for method, path, body in every_call(conversation.id)[2:]:
        theirs = send(client, method, path, body)
        missing = send(client, method, path.replace(str(conversation.id), str(uuid.uuid4())), body)
        assert theirs.status_code == missing.status_code == 404, (method, path)
        assert theirs.json() == missing.json()
        assert theirs.json()["error"]["code"] == "not_found"
    listed = client.get(BASE).json()["items"]
    assert all(item["id"] != str(conversation.id) for item in listed)
    conversation.refresh_from_db()
    assert conversation.title == "Alice's secrets"


def test_a_malformed_id_is_422(alice):
    response = session(alice).get(f"{BASE}/not-a-uuid")
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
