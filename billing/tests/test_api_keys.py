import io
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from agentsite.errors import ApplicationError
from billing.models import Account, ApiKey, Membership
from billing.services import (
    account_for_user,
    api_key_create,
    api_key_revoke,
    api_key_verify,
)
from chat import services as chat_services
from chat.models import Run
from tracing import services as tracing_services

pytestmark = pytest.mark.django_db

HEADER = "X-API-Key"


def make_run_with_trace(user):
    conversation = chat_services.conversation_create(owner=user)
    run = Run.objects.create(conversation=conversation, model="m")
    tracing_services.trace_start(
        run_id=run.id, user_id=user.id, model="m", started_at=timezone.now()
    )
    return run


def make_key(user, **kwargs):
    kwargs.setdefault("scopes", ["runs", "traces", "usage"])
    return api_key_create(
        account=account_for_user(user_id=user.id), created_by=user, name="test", **kwargs
    )


def get_trace(run, raw_key):
    return Client().get(f"/api/v1/runs/{run.id}/trace", headers={HEADER: raw_key})


def test_the_raw_key_is_nowhere_in_the_database(make_user):
    user = make_user()
    api_key, raw_key = make_key(user)
    secret = raw_key[len(api_key.prefix) + 1 :]
    assert raw_key.startswith(api_key.prefix + "_") and len(secret) >= 43
    row = ApiKey.objects.filter(pk=api_key.pk).values().get()
    for column, value in row.items():
        assert secret not in str(value), column
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiKey._meta.db_table}")
        table = repr(cursor.fetchall())
    assert api_key.prefix in table and secret not in table
    dump = io.StringIO()
    call_command("dumpdata", stdout=dump)
    assert secret not in dump.getvalue()


def test_a_key_in_the_header_reads_its_users_trace(make_user):
    user = make_user()
    run = make_run_with_trace(user)
    _, raw_key = make_key(user)
    response = get_trace(run, raw_key)
    assert response.status_code == 200, response.content
    assert response.json()["run_id"] == str(run.id)


@pytest.mark.parametrize(
    "state, code",
    [("revoked", "api_key_revoked"), ("expired", "api_key_expired")],
)
def test_revoked_and_expired_keys_are_refused_with_the_reason(make_user, state, code):
    user = make_user()
    run = make_run_with_trace(user)
    api_key, raw_key = make_key(user)
    if state == "revoked":
        api_key_revoke(api_key=api_key)
    else:
        api_key.expires_at = timezone.now() - timedelta(seconds=1)
        api_key.save(update_fields=["expires_at"])
    response = get_trace(run, raw_key)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == code
    assert state in error["message"]
    with pytest.raises(ApplicationError):
        api_key_verify(raw_key=raw_key)


def test_malformed_unknown_and_wrong_secret_keys_get_a_generic_401(make_user):
    user = make_user()
    run = make_run_with_trace(user)
    api_key, raw_key = make_key(user)
    api_key_revoke(api_key=api_key)
    wrong_secret = raw_key[:-4] + ("AAAA" if not raw_key.endswith("AAAA") else "BBBB")
    unknown = "ak_00000000_" + "A" * 43
    for bad in ("nonsense", raw_key + "x", unknown, wrong_secret):
        response = get_trace(run, bad)
        assert response.status_code == 401, bad
        # A prefix is not secret: without the whole key, the key's state is not told.
        assert response.json()["error"] == {
            "code": "invalid_api_key",
            "message": "The API key is not valid.",
            "details": None,
        }


def test_no_key_and_no_session_is_unauthenticated(make_user):
    run = make_run_with_trace(make_user())
    response = Client().get(f"/api/v1/runs/{run.id}/trace")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


def test_one_accounts_key_cannot_read_another_accounts_trace(make_user):
    alice, bob = make_user("alice"), make_user("bob")
    assert account_for_user(user_id=alice.id) != account_for_user(user_id=bob.id)
    run = make_run_with_trace(alice)
    _, bobs_key = make_key(bob)
    response = get_trace(run, bobs_key)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_a_staff_user_sees_only_their_own_traces_through_the_api(make_user):
    alice = make_user("alice")
    staff = get_user_model().objects.create_user("ops", password="x", is_staff=True)
    run = make_run_with_trace(alice)
    _, raw_key = make_key(staff)
    assert get_trace(run, raw_key).status_code == 404
    # Signed in, too: the API has one ownership policy; operators browse in the app.
    client = Client()
    client.force_login(staff)
    assert client.get(f"/api/v1/runs/{run.id}/trace").status_code == 404
    assert client.get(f"/traces/{run.id}/").status_code == 200


def test_a_key_without_the_traces_scope_is_forbidden(make_user):
    user = make_user()
    run = make_run_with_trace(user)
    _, raw_key = make_key(user, scopes=["runs"])
    response = get_trace(run, raw_key)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"


def test_unknown_scopes_and_strangers_accounts_are_refused(make_user):
    from agentsite.errors import ApplicationError

    alice, bob = make_user("alice"), make_user("bob")
    with pytest.raises(ApplicationError, match="unknown: admin"):
        make_key(alice, scopes=["runs", "admin"])
    with pytest.raises(ApplicationError):
        make_key(alice, scopes=[])
    with pytest.raises(ApplicationError, match="not a member"):
        api_key_create(
            account=account_for_user(user_id=bob.id),
            created_by=alice,
            name="x",
            scopes=["runs"],
        )
    assert not ApiKey.objects.exists()


def test_last_used_at_is_updated_at_most_once_a_minute(make_user):
    user = make_user()
    api_key, raw_key = make_key(user)
    assert api_key.last_used_at is None
    assert api_key_verify(raw_key=raw_key) is not None
    api_key.refresh_from_db()
    first = api_key.last_used_at
    assert first is not None
    assert api_key_verify(raw_key=raw_key) is not None
    api_key.refresh_from_db()
    assert api_key.last_used_at == first  # throttled: no write within the minute
    ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=first - timedelta(minutes=2))
    assert api_key_verify(raw_key=raw_key) is not None
    api_key.refresh_from_db()
    assert api_key.last_used_at > first - timedelta(minutes=2)


def test_the_management_command_prints_a_working_key(make_user):
    user = make_user()
    run = make_run_with_trace(user)
    out, err = io.StringIO(), io.StringIO()
    call_command(
        "create_api_key",
        "alice",
        "--name",
        "ci",
        "--scopes",
        "traces",
        "--expires-days",
        "7",
        stdout=out,
        stderr=err,
    )
    raw_key = out.getvalue().strip()
    assert "not shown again" in err.getvalue()
    api_key = ApiKey.objects.get()
    assert api_key.name == "ci" and api_key.scopes == ["traces"]
    assert api_key.expires_at is not None and api_key.expires_at > timezone.now()
    assert get_trace(run, raw_key).status_code == 200


def test_the_admin_shows_a_new_key_once_and_revokes_keys(make_user):
    user = make_user()
    run = make_run_with_trace(user)
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(admin)
    assert client.get(reverse("admin:billing_apikey_add")).status_code == 200
    response = client.post(
        reverse("admin:billing_apikey_add"),
        {
            "created_by": user.id,
            "name": "from the admin",
            "scopes": ["runs", "traces"],
            "expires_at_0": "",
            "expires_at_1": "",
        },
        follow=True,
    )
    assert response.status_code == 200
    api_key = ApiKey.objects.get()
    assert api_key.account == account_for_user(user_id=user.id)
    assert api_key.created_by == user
    shown = [str(m) for m in response.context["messages"] if "shown again" in str(m)]
    assert len(shown) == 1
    raw_key = shown[0].rsplit(" ", 1)[-1]
    assert raw_key.encode() in response.content
    assert raw_key.startswith(api_key.prefix + "_")
    assert get_trace(run, raw_key).status_code == 200
    # Shown through a message, the key must not have been parked in the session table.
    dump = io.StringIO()
    call_command("dumpdata", stdout=dump)
    assert raw_key.split("_", 2)[2] not in dump.getvalue()
    # Once: the next pages (list and the key's own page) do not show it, nor the hash.
    for url in (
        reverse("admin:billing_apikey_changelist"),
        reverse("admin:billing_apikey_change", args=[api_key.id]),
    ):
        page = client.get(url)
        assert page.status_code == 200
        assert raw_key.encode() not in page.content
        assert api_key.key_hash.encode() not in page.content
        assert api_key.prefix.encode() in page.content

    response = client.post(
        reverse("admin:billing_apikey_changelist"),
        {"action": "revoke_selected", "_selected_action": [api_key.id]},
        follow=True,
    )
    assert response.status_code == 200
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None
    assert get_trace(run, raw_key).json()["error"]["code"] == "api_key_revoked"


def test_a_key_stops_working_when_its_user_moves_to_another_account(make_user):
    user = make_user()
    run = make_run_with_trace(user)
    _, raw_key = make_key(user)
    other = Account.objects.create(name="elsewhere")

    Membership.objects.filter(user=user).update(account=other)

    response = get_trace(run, raw_key)
    assert response.status_code == 401
    assert response.json()["error"]["message"] == (
        "The API key's user no longer belongs to the key's account."
    )


def test_a_key_made_to_expire_in_the_past_is_refused_by_the_service_and_the_admin(make_user):
    user = make_user()
    with pytest.raises(ApplicationError) as refused:
        make_key(user, expires_at=timezone.now() - timedelta(minutes=1))
    assert refused.value.code == "invalid_expires_at"
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(admin)
    response = client.post(
        reverse("admin:billing_apikey_add"),
        {
            "created_by": user.id,
            "name": "stale",
            "scopes": ["runs"],
            "expires_at_0": "2020-01-01",
            "expires_at_1": "00:00:00",
        },
    )
    assert response.status_code == 200  # the form again, with the error
    assert b"must be in the future" in response.content
    assert not ApiKey.objects.exists()
