"""API-key management over the JSON API: /api/v1/api-keys… (the account's owner, from a
browser session)."""

import json
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from agentsite.idempotency.models import IdempotencyKey
from billing.models import ApiKey, Membership
from billing.services import account_for_user, api_key_create, api_key_revoke, api_key_verify

pytestmark = pytest.mark.django_db

HEADER = "X-API-Key"
BASE = "/api/v1/api-keys"


def session(user):
    client = Client()
    client.force_login(user)
    return client


def create(client, **body):
    body.setdefault("name", "ci")
    body.setdefault("scopes", ["runs"])
    return client.post(BASE, json.dumps(body), content_type="application/json")


def make_key(user, scopes=("runs", "traces", "usage"), name="k"):
    return api_key_create(
        account=account_for_user(user_id=user.id), created_by=user, name=name, scopes=scopes
    )


@pytest.fixture
def owner(make_user):
    user = make_user("olivia")
    account_for_user(user_id=user.id)  # a first user owns their personal account
    return user


@pytest.fixture
def member(make_user, owner):
    user = make_user("mike")
    Membership.objects.create(
        user=user, account=account_for_user(user_id=owner.id), role=Membership.Role.MEMBER
    )
    return user


def test_the_owner_creates_a_key_and_sees_it_whole_only_in_the_answer(owner):
    client = session(owner)
    expires = timezone.now() + timedelta(days=30)
    response = create(
        client,
        name="  deploy bot ",
        scopes=["usage", "runs", "usage"],
        expires_at=expires.isoformat(),
    )
    assert response.status_code == 201, response.content
    body = response.json()
    raw_key = body.pop("key")
    api_key = api_key_verify(raw_key=raw_key)
    assert api_key.created_by == owner and api_key.account == account_for_user(user_id=owner.id)
    assert body["id"] == api_key.pk and raw_key.startswith(body["prefix"] + "_")
    assert body["name"] == "deploy bot" and body["scopes"] == ["runs", "usage"]
    assert body["revoked_at"] is None and body["last_used_at"] is None
    assert body["expires_at"] is not None
    # The key works, within its scopes.
    assert Client().get("/api/v1/usage", headers={HEADER: raw_key}).status_code == 200
    listed = client.get(BASE)
    assert listed.status_code == 200
    secret = raw_key[len(body["prefix"]) + 1 :]
    assert secret not in listed.content.decode()
    assert api_key.key_hash not in listed.content.decode()
    [item] = listed.json()["items"]
    assert set(item) == {
        "id",
        "name",
        "prefix",
        "scopes",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    }
    assert item["prefix"] == body["prefix"] and item["last_used_at"] is not None


def test_a_retry_with_the_same_idempotency_key_makes_one_key_and_keeps_no_secret(owner):
    client = session(owner)
    body = json.dumps({"name": "ci", "scopes": ["runs"]})

    def post(raw_body, key="k1"):
        return client.post(
            BASE, raw_body, content_type="application/json", headers={"Idempotency-Key": key}
        )

    first = post(body)
    assert first.status_code == 201, first.content
    raw_key = first.json()["key"]
    assert api_key_verify(raw_key=raw_key).pk == first.json()["id"]
    again = post(body)
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    # The replay is the first response but for the secret, which is kept nowhere.
    assert again.json() == {**first.json(), "key": None}
    assert ApiKey.objects.count() == 1
    secret = raw_key.split("_", 2)[2]
    stored = IdempotencyKey.objects.values_list("response_body", flat=True).get()
    assert secret not in json.dumps(stored)
    reused = post(json.dumps({"name": "other", "scopes": ["runs"]}))
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"


def test_the_list_holds_every_key_of_the_account_and_no_other(owner, member, make_user):
    make_key(member, name="member's")
    make_key(owner, name="owner's")
    revoked, _ = make_key(owner, name="revoked")
    api_key_revoke(api_key=revoked)
    make_key(make_user("stranger"), name="stranger's")
    items = session(owner).get(BASE).json()["items"]
    assert [item["name"] for item in items] == ["revoked", "owner's", "member's"]
    assert items[0]["revoked_at"] is not None


def test_revoking_refuses_the_key_and_is_idempotent(owner):
    api_key, raw_key = make_key(owner)
    client = session(owner)
    first = client.post(f"{BASE}/{api_key.pk}/revoke")
    assert first.status_code == 200, first.content
    assert first.json()["revoked_at"] is not None
    again = client.post(f"{BASE}/{api_key.pk}/revoke")
    assert again.status_code == 200 and again.json() == first.json()
    refused = Client().get("/api/v1/usage", headers={HEADER: raw_key})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "api_key_revoked"


def test_another_accounts_key_is_not_found_exactly_like_a_missing_one(owner, make_user):
    theirs, raw_key = make_key(make_user("stranger"))
    client = session(owner)
    response = client.post(f"{BASE}/{theirs.pk}/revoke")
    missing = client.post(f"{BASE}/{theirs.pk + 1000}/revoke")
    assert response.status_code == missing.status_code == 404
    assert response.json() == missing.json()
    assert response.json()["error"]["code"] == "not_found"
    assert api_key_verify(raw_key=raw_key) == theirs  # still works


def test_a_member_who_is_not_the_owner_is_403(owner, member):
    owners_key, _ = make_key(owner)
    client = session(member)
    for response in (
        create(client),
        client.get(BASE),
        client.post(f"{BASE}/{owners_key.pk}/revoke"),
    ):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "not_account_owner"
    assert ApiKey.objects.get(pk=owners_key.pk).revoked_at is None
    assert ApiKey.objects.count() == 1


def test_an_api_key_cannot_manage_keys_even_the_owners_with_every_scope(owner):
    api_key, raw_key = make_key(owner)
    client = Client(enforce_csrf_checks=True, headers={HEADER: raw_key})
    for response in (
        create(client),
        client.get(BASE),
        client.post(f"{BASE}/{api_key.pk}/revoke"),
    ):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "session_required"
    assert ApiKey.objects.get(pk=api_key.pk).revoked_at is None
    assert ApiKey.objects.count() == 1


def test_no_bad_or_revoked_credentials_are_401(owner):
    api_key, raw_key = make_key(owner)
    _, revoked_key = make_key(owner)
    api_key_revoke(api_key=ApiKey.objects.get(prefix=revoked_key[:11]))
    clients = [(Client(enforce_csrf_checks=True), "unauthenticated")] + [
        (Client(enforce_csrf_checks=True, headers={HEADER: bad}), code)
        for bad, code in [
            ("nonsense", "invalid_api_key"),
            (raw_key[:-2] + "xx", "invalid_api_key"),
            (revoked_key, "api_key_revoked"),
        ]
    ]
    for client, code in clients:
        for response in (
            create(client),
            client.get(BASE),
            client.post(f"{BASE}/{api_key.pk}/revoke"),
        ):
            assert response.status_code == 401
            assert response.json()["error"]["code"] == code
    assert ApiKey.objects.count() == 2


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"name": ""}, 422, "invalid_request"),
        ({"name": "x" * 101}, 422, "invalid_request"),
        ({"scopes": []}, 422, "invalid_request"),
        ({"scopes": ["admin"]}, 422, "invalid_request"),
        ({"scopes": "runs"}, 422, "invalid_request"),
        ({"expires_at": "2999-01-01T00:00:00"}, 422, "invalid_request"),  # no time zone
        ({"expires_at": "soon"}, 422, "invalid_request"),
        ({"owner": "mallory"}, 422, "invalid_request"),  # no such field
        ({"name": "lone \ud800"}, 422, "invalid_request"),  # not Unicode: not a string
        # Well-formed, but against the rules:
        ({"name": "   "}, 400, "invalid_name"),
        ({"name": "nul\x00"}, 400, "invalid_name"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, 400, "invalid_expires_at"),
    ],
)
def test_bad_input_is_refused_with_its_code_and_creates_nothing(owner, body, status, code):
    response = create(session(owner), **body)
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert not ApiKey.objects.exists()


@pytest.mark.parametrize("raw", ["[]", '"name"', "null", "{", "\x18\xff"])
def test_a_body_that_is_not_a_json_object_is_refused(owner, raw):
    response = session(owner).post(BASE, raw, content_type="application/json")
    assert response.status_code in (400, 422), response.content
    assert response.json()["error"]["code"] in ("bad_request", "invalid_request")
    assert not ApiKey.objects.exists()


def test_an_id_beyond_any_integer_column_is_not_found(owner):
    response = session(owner).post(f"{BASE}/{2**70}/revoke")
    assert response.status_code == 404


def test_a_body_over_the_limit_is_413_as_the_schema_declares(owner, settings):
    settings.AGENT_API_MAX_BODY_BYTES = 1000
    response = create(session(owner), name="x" * 2000)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    declared = Client().get("/api/openapi.json").json()["paths"][BASE]["post"]["responses"]
    assert "413" in declared
