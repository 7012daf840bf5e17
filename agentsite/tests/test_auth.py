"""The JSON API's authentication (agentsite.auth, billing.auth) and its one error shape
(agentsite.api_errors), on the real database. Operations no real endpoint has yet (an
unsafe method, async ones, failures) are probes (api_probe.py), composed like the API."""

import ast
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient, Client
from django.utils import timezone

from billing.models import ApiKey
from billing.services import account_for_user, api_key_create, api_key_revoke
from chat import services as chat_services
from conftest import account_with_limits

pytestmark = [pytest.mark.django_db, pytest.mark.urls("agentsite.tests.api_probe")]

HEADER = "X-API-Key"
CSRF = "a" * 32  # a CSRF secret as the cookie holds it; Django accepts it unmasked too


def make_key(user, scopes=("runs", "traces", "usage"), **kwargs):
    return api_key_create(
        account=account_for_user(user_id=user.id),
        created_by=user,
        name="test",
        scopes=scopes,
        **kwargs,
    )


def error_of(response, status, code):
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    return body["error"]


def test_a_key_in_the_header_or_as_a_bearer_token_is_its_user_in_its_account(make_user):
    user = make_user()
    api_key, raw_key = make_key(user, scopes=["runs"])
    expected = {
        "user_id": user.id,
        "account_id": api_key.account_id,
        "api_key_id": api_key.id,
        "scopes": ["runs"],
    }
    for headers in ({HEADER: raw_key}, {"Authorization": f"Bearer {raw_key}"}):
        response = Client().get("/api/probe/whoami", headers=headers)
        assert response.status_code == 200, response.content
        assert response.json() == expected


def test_a_session_is_its_user_with_every_scope(make_user):
    user = make_user()
    client = Client()
    client.force_login(user)
    response = client.get("/api/probe/whoami")
    assert response.json() == {
        "user_id": user.id,
        "account_id": account_for_user(user_id=user.id).id,
        "api_key_id": None,
        "scopes": None,
    }


@pytest.mark.parametrize("scheme", [HEADER, "Authorization"])
def test_missing_invalid_revoked_and_expired_keys_get_distinct_401s(make_user, scheme):
    def get(raw_key):
        value = raw_key if scheme == HEADER else f"Bearer {raw_key}"
        return Client().get("/api/v1/usage", headers={scheme: value})

    user = make_user()
    error_of(Client().get("/api/v1/usage"), 401, "unauthenticated")
    error_of(get("ak_nonsense"), 401, "invalid_api_key")
    revoked, raw_revoked = make_key(user)
    api_key_revoke(api_key=revoked)
    error_of(get(raw_revoked), 401, "api_key_revoked")
    expired, raw_expired = make_key(user, expires_at=timezone.now() + timedelta(seconds=1))
    # Made to expire in the future (the service refuses a past expiry); it has since.
    ApiKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    error_of(get(raw_expired), 401, "api_key_expired")


def test_a_key_without_the_scope_is_forbidden(make_user):
    _, raw_key = make_key(make_user(), scopes=["traces"])
    response = Client().get("/api/v1/usage", headers={"Authorization": f"Bearer {raw_key}"})
    error = error_of(response, 403, "insufficient_scope")
    assert "'usage'" in error["message"]


def test_a_session_must_send_the_csrf_token_on_an_unsafe_method(make_user):
    user = make_user()
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    browser.cookies["csrftoken"] = CSRF
    refused = browser.post("/api/probe/echo", {"text": "hi"}, content_type="application/json")
    error_of(refused, 403, "csrf_failed")
    allowed = browser.post(
        "/api/probe/echo",
        {"text": "hi"},
        content_type="application/json",
        headers={"X-CSRFToken": CSRF},
    )
    assert allowed.status_code == 200 and allowed.json() == {"text": "hi"}
    # Safe methods need no token.
    assert browser.get("/api/probe/whoami").status_code == 200


def test_a_key_needs_no_csrf_token_and_anonymity_is_401_not_a_csrf_failure(make_user):
    _, raw_key = make_key(make_user())
    client = Client(enforce_csrf_checks=True)
    response = client.post(
        "/api/probe/echo",
        {"text": "hi"},
        content_type="application/json",
        headers={HEADER: raw_key},
    )
    assert response.status_code == 200, response.content
    anonymous = client.post("/api/probe/echo", {"text": "hi"}, content_type="application/json")
    error_of(anonymous, 401, "unauthenticated")


def test_another_users_object_is_the_same_404_as_a_missing_or_malformed_one(make_user):
    alice, mallory = make_user("alice"), make_user("mallory")
    conversation = chat_services.conversation_create(owner=alice)
    _, alices_key = make_key(alice)
    _, mallorys_key = make_key(mallory)
    path = "/api/probe/conversations/{}"
    mine = Client().get(path.format(conversation.id), headers={HEADER: alices_key})
    assert mine.json() == {"id": str(conversation.id)}
    theirs = Client().get(path.format(conversation.id), headers={HEADER: mallorys_key})
    missing = Client().get(path.format(uuid.uuid4()), headers={HEADER: mallorys_key})
    assert error_of(theirs, 404, "not_found") == error_of(missing, 404, "not_found")
    malformed = Client().get("/api/probe/async/conversations/nope", headers={HEADER: alices_key})
    assert malformed.json() == missing.json()


@pytest.mark.django_db(transaction=True)
async def test_async_operations_authenticate_keys_and_sessions_without_sync_db_errors(
    make_user,
):
    alice = await sync_to_async(make_user)("alice")
    bob = await sync_to_async(make_user)("bob")
    conversation = await sync_to_async(chat_services.conversation_create)(owner=alice)
    api_key, raw_key = await sync_to_async(make_key)(alice)
    _, bobs_key = await sync_to_async(make_key)(bob)
    client = AsyncClient()

    response = await client.get("/api/probe/async/whoami", headers={HEADER: raw_key})
    assert response.status_code == 200, response.content
    assert response.json()["api_key_id"] == api_key.id
    bearer = await client.get(
        f"/api/probe/async/conversations/{conversation.id}",
        headers={"Authorization": f"Bearer {raw_key}"},
    )
    assert bearer.json() == {"id": str(conversation.id)}
    theirs = await client.get(
        f"/api/probe/async/conversations/{conversation.id}", headers={HEADER: bobs_key}
    )
    error_of(theirs, 404, "not_found")
    await sync_to_async(api_key_revoke)(api_key=api_key)
    revoked = await client.get("/api/probe/async/whoami", headers={HEADER: raw_key})
    error_of(revoked, 401, "api_key_revoked")

    browser = AsyncClient()
    await browser.aforce_login(alice)
    signed_in = await browser.get("/api/probe/async/whoami")
    assert signed_in.status_code == 200, signed_in.content
    assert signed_in.json()["user_id"] == alice.id and signed_in.json()["scopes"] is None
    error_of(await AsyncClient().get("/api/probe/async/whoami"), 401, "unauthenticated")


def test_a_body_over_the_limit_is_413_before_anything_reads_it(make_user, settings):
    settings.AGENT_API_MAX_BODY_BYTES = 100
    _, raw_key = make_key(make_user())
    headers = {HEADER: raw_key}
    small = Client().post(
        "/api/probe/echo", {"text": "x" * 50}, content_type="application/json", headers=headers
    )
    assert small.status_code == 200
    big = Client().post(
        "/api/probe/echo", {"text": "x" * 200}, content_type="application/json", headers=headers
    )
    error = error_of(big, 413, "request_too_large")
    assert "100 bytes" in error["message"]


def test_invalid_input_is_422_whether_ninja_or_django_finds_it(make_user):
    _, raw_key = make_key(make_user())
    headers = {HEADER: raw_key}
    schema = Client().post("/api/probe/echo", {}, content_type="application/json", headers=headers)
    assert error_of(schema, 422, "invalid_request")["details"][0]["loc"] == ["body", "body", "text"]
    model = Client().post("/api/probe/invalid", headers=headers)
    assert error_of(model, 422, "invalid_request")["details"] == {"title": ["Too long."]}
    unparsable = Client().post(
        "/api/probe/echo", "{not json", content_type="application/json", headers=headers
    )
    assert unparsable.status_code in (400, 422)
    assert unparsable.json()["error"]["code"] in ("bad_request", "invalid_request")


def test_an_unexpected_failure_is_a_500_in_the_shape_without_its_traceback(make_user, caplog):
    _, raw_key = make_key(make_user())
    response = Client().get("/api/probe/boom", headers={HEADER: raw_key})
    error = error_of(response, 500, "internal_error")
    assert b"secret internals" not in response.content and b"Traceback" not in response.content
    assert error["details"] is None
    assert "secret internals" in caplog.text  # logged for the operator


def test_unknown_routes_and_methods_answer_in_the_shape(make_user):
    _, raw_key = make_key(make_user())
    headers = {HEADER: raw_key}
    error_of(Client().get("/api/v1/nothing-here", headers=headers), 404, "not_found")
    error_of(Client().post("/api/nope/"), 404, "not_found")
    wrong_method = Client().delete("/api/v1/usage", headers=headers)
    error_of(wrong_method, 405, "method_not_allowed")
    assert wrong_method["Allow"] == "GET"


def test_over_the_rate_limit_is_429_with_retry_after(make_user):
    user = make_user()
    account_with_limits(user, requests_per_minute_per_account=1)
    _, raw_key = make_key(user)
    assert Client().get("/api/v1/usage", headers={HEADER: raw_key}).status_code == 200
    response = Client().get("/api/v1/usage", headers={HEADER: raw_key})
    error = error_of(response, 429, "rate_limited")
    assert response["Retry-After"] == str(error["details"]["retry_after"])


def test_operations_declare_their_error_statuses():
    schema = Client().get("/api/openapi.json").json()
    usage = schema["paths"]["/api/v1/usage"]["get"]["responses"]
    assert {"200", "401", "403", "422", "429"} <= set(usage)
    error = usage["401"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorOut"}
    trace = schema["paths"]["/api/v1/runs/{run_id}/trace"]["get"]["responses"]
    assert {"200", "401", "403", "404", "422", "429"} <= set(trace)


def test_the_scopes_are_one_set_that_routers_name_without_billing():
    from agentsite.auth import Scope

    assert ApiKey.Scope is Scope
    assert set(Scope.values) == {"runs", "traces", "usage"}
    root = Path(__file__).resolve().parents[2]
    for router in ("chat/api.py", "chat/runs_api.py", "billing/api.py", "tracing/api.py"):
        tree = ast.parse((root / router).read_text())
        nodes = list(ast.walk(tree))
        modules = [n.module or "" for n in nodes if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in nodes if isinstance(n, ast.Import) for a in n.names]
        if router != "billing/api.py":
            assert not [m for m in modules if m.split(".")[0] == "billing"], router
        scopes = [
            n.args[1]
            for n in nodes
            if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "require_scope"
        ]
        assert scopes and not [s for s in scopes if isinstance(s, ast.Constant)], router


def test_every_lookup_for_a_caller_has_the_one_not_found(make_user, monkeypatch):
    """The selectors that find a caller's object say "not found" through agentsite.auth,
    so what another's object is (the same 404 as a missing one) is defined once."""
    from agentsite import auth
    from billing.selectors import api_key_get
    from chat.selectors import conversation_get
    from tracing.selectors import trace_absence, trace_get
    from tracing.tests.test_api import make_trace

    class Marked(auth.ApplicationError):
        pass

    monkeypatch.setattr(auth, "not_found", lambda name: Marked("not_found", name, 404))
    alice, mallory = make_user("alice"), make_user("mallory")
    trace = make_trace(alice)
    key, _ = make_key(alice)
    lookups = [
        lambda: conversation_get(user=mallory, conversation_id=trace.run.conversation_id),
        lambda: api_key_get(account=account_for_user(user_id=mallory.id), api_key_id=key.pk),
        lambda: trace_get(user=mallory, run_id=trace.run_id),
        lambda: trace_absence(user=mallory, run_id=trace.run_id),
    ]
    for lookup in lookups:
        with pytest.raises(Marked):
            lookup()
