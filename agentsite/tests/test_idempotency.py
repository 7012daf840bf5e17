"""Idempotency-Key's services, as any app's POST uses them (the runs endpoints' own use
is tested in chat/tests/test_runs_api.py, the concurrent case on PostgreSQL in
tests/test_runs_api_server.py)."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from agentsite.errors import ApplicationError
from agentsite.idempotency.models import IdempotencyKey
from agentsite.idempotency.services import (
    KEEP,
    IdempotentRequest,
    StoredResponse,
    idempotency_claim,
    idempotency_key_clean,
    idempotency_prune,
    idempotent,
    request_fingerprint,
)

pytestmark = pytest.mark.django_db


def fingerprint(body: bytes = b'{"name": "x"}', **overrides) -> str:
    parts = {"method": "POST", "path": "/api/v1/things", "caller": 1, "body": body, **overrides}
    return request_fingerprint(**parts)


def keyed(key="key-1", account_id=7, body=b'{"name": "x"}') -> IdempotentRequest:
    return IdempotentRequest(account_id=account_id, key=key, fingerprint=fingerprint(body))


class Creator:
    """A create that counts its calls, answering 201 with the call's number."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> StoredResponse:
        self.calls += 1
        return StoredResponse(201, {"n": self.calls}, {"Location": f"/things/{self.calls}"})


def test_the_same_request_again_gets_the_first_response_and_creates_nothing():
    create = Creator()
    first = idempotent(request=keyed(), create=create)
    again = idempotent(request=keyed(), create=create)
    assert create.calls == 1
    assert not first.replayed and again.replayed
    assert (
        again.response == first.response == StoredResponse(201, {"n": 1}, {"Location": "/things/1"})
    )


def test_without_a_key_every_request_creates():
    create = Creator()
    idempotent(request=None, create=create)
    idempotent(request=None, create=create)
    assert create.calls == 2


def test_a_different_request_with_the_key_is_422():
    create = Creator()
    idempotent(request=keyed(), create=create)
    with pytest.raises(ApplicationError) as refused:
        idempotent(request=keyed(body=b'{"name": "y"}'), create=create)
    assert (refused.value.code, refused.value.http_status) == ("idempotency_key_reused", 422)
    assert create.calls == 1


def test_keys_are_each_accounts_own():
    create = Creator()
    idempotent(request=keyed(account_id=1), create=create)
    other = idempotent(request=keyed(account_id=2), create=create)
    assert not other.replayed and create.calls == 2


def test_a_create_that_fails_leaves_the_key_free():
    def fail() -> StoredResponse:
        raise ApplicationError("nope", "Refused.", http_status=409)

    with pytest.raises(ApplicationError):
        idempotent(request=keyed(), create=fail)
    assert not IdempotencyKey.objects.exists()
    assert not idempotent(request=keyed(), create=Creator()).replayed


@pytest.mark.django_db(transaction=True)
def test_a_claim_outside_the_creating_transaction_is_a_bug():
    with pytest.raises(RuntimeError):
        idempotency_claim(request=keyed())


def test_a_key_without_a_response_cannot_reach_a_simple_create():
    # A simple create records its response in the transaction that claims the key, so
    # no retry can find the key without one (no 409 to answer, none declared): a row
    # like this one (a run's, whose `wait` response comes later) would be a bug.
    with transaction.atomic():
        assert idempotency_claim(request=keyed()) is None
    with pytest.raises(AssertionError):
        idempotent(request=keyed(), create=Creator())


def test_a_key_is_kept_24_hours_then_free_again():
    create = Creator()
    idempotent(request=keyed(), create=create)
    IdempotencyKey.objects.update(created_at=timezone.now() - KEEP + timedelta(minutes=1))
    assert idempotent(request=keyed(), create=create).replayed  # still held
    IdempotencyKey.objects.update(created_at=timezone.now() - KEEP - timedelta(minutes=1))
    fresh = idempotent(request=keyed(body=b'{"name": "new"}'), create=create)
    assert not fresh.replayed and fresh.response.body == {"n": 2}
    assert IdempotencyKey.objects.count() == 1


def test_prune_deletes_only_expired_keys(capsys):
    now = timezone.now()
    for index, age in enumerate((KEEP + timedelta(seconds=1), KEEP - timedelta(minutes=1))):
        IdempotencyKey.objects.create(
            account_id=1, key=f"k{index}", fingerprint="f", created_at=now - age
        )
    assert idempotency_prune(now=now) == 1
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["k1"]
    IdempotencyKey.objects.update(created_at=now - KEEP - timedelta(seconds=1))
    call_command("idempotency_prune")
    assert "Deleted 1 expired" in capsys.readouterr().out
    assert not IdempotencyKey.objects.exists()


@pytest.mark.parametrize("key", ["", " ", "\t", "k" * 256, "nul\x00", "caf\u00e9", "a\tb"])
def test_a_blank_or_overlong_key_is_400(key):
    with pytest.raises(ApplicationError) as refused:
        idempotency_key_clean(key=key)
    assert (refused.value.code, refused.value.http_status) == ("invalid_idempotency_key", 400)


def test_a_key_of_255_characters_is_fine():
    assert idempotency_key_clean(key="k" * 255) == "k" * 255


def test_the_fingerprint_is_the_method_path_caller_and_body_content():
    base = fingerprint()
    assert fingerprint(b'{ "name" : "x" }') == base  # spelling is not content
    assert fingerprint(b'{"name": "y"}') != base
    assert fingerprint(method="PUT") != base
    assert fingerprint(path="/api/v1/things?x=1") != base
    assert fingerprint(caller=2) != base
    assert fingerprint(b"not json") == fingerprint(b"not json") != fingerprint(b"not json!")


def test_a_create_endpoint_needs_one_call():
    from django.test import RequestFactory

    from agentsite.auth import Principal
    from agentsite.idempotency.http import idempotent_response

    caller = Principal(user_id=1, account_id=7, api_key_id=None, scopes=None)
    create = Creator()

    def post(body: str, **headers: str):
        request = RequestFactory().post("/api/v1/things", body, "application/json", headers=headers)
        return idempotent_response(request, caller=caller, create=create)

    first = post('{"name": "x"}', **{"Idempotency-Key": "one"})
    again = post('{"name":"x"}', **{"Idempotency-Key": "one"})
    assert (first.status_code, first["Location"]) == (201, "/things/1")
    assert "Idempotent-Replayed" not in first and again["Idempotent-Replayed"] == "true"
    assert again.content == first.content and create.calls == 1
    with pytest.raises(ApplicationError) as reused:  # the API answers it 422
        post('{"name": "y"}', **{"Idempotency-Key": "one"})
    assert reused.value.code == "idempotency_key_reused"
    unkeyed = post('{"name": "x"}')
    assert unkeyed.status_code == 201 and create.calls == 2
