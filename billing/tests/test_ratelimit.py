"""Requests per minute: per account, per API key, over HTTP and the chat socket, in
memory and in Redis."""

import threading
import uuid

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from billing.models import Account
from billing.ratelimit import RateLimitExceeded, limiter_build, rate_limit_hit
from billing.services import account_for_user, api_key_create
from chat import services as chat_services
from conftest import open_socket, receive_until
from tests.servers import REDIS_URL, redis_available

HEADER = "X-API-Key"


STORAGES = [
    pytest.param("", id="memory"),
    pytest.param(
        REDIS_URL,
        id="redis",
        marks=pytest.mark.skipif(
            not redis_available(),
            reason="Redis is NOT reachable on 127.0.0.1:6379: Redis rate limits untested",
        ),
    ),
]


@pytest.fixture(autouse=True)
def fresh_counts():
    """Counts outlive a test (the memory limiter lives as long as the process, and
    account ids repeat after a rollback), so every test starts and ends with none."""
    uris = {"memory://"}
    yield uris
    for uri in uris:
        limiter_build(uri).storage.reset()


@pytest.fixture(params=STORAGES)
def storage(request, settings, fresh_counts):
    """Count in memory or in Redis (as AGENT_REDIS_URL would), from zero."""
    settings.REDIS_URL = request.param
    uri = request.param or "memory://"
    fresh_counts.add(uri)
    limiter_build(uri).storage.reset()
    return uri


def account_of(user, **limits) -> Account:
    account = account_for_user(user_id=user.id)
    if limits:
        Account.objects.filter(pk=account.pk).update(**limits)
        account = account_for_user(user_id=user.id)
    return account


def make_key(user, account):
    return api_key_create(account=account, created_by=user, name="test", scopes=["traces"])


def refusal(**kwargs) -> RateLimitExceeded:
    with pytest.raises(RateLimitExceeded) as caught:
        rate_limit_hit(**kwargs)
    return caught.value


def unknown_trace(client: Client, raw_key: str | None = None):
    headers = {HEADER: raw_key} if raw_key else {}
    return client.get(f"/api/v1/runs/{uuid.uuid4()}/trace", headers=headers)


@pytest.mark.django_db
def test_n_requests_pass_and_the_next_is_refused_until_the_window_moves(make_user, storage):
    account = account_of(make_user(), requests_per_minute_per_account=3)
    for _ in range(3):
        rate_limit_hit(account=account)

    error = refusal(account=account)
    assert error.code == "rate_limited" and error.http_status == 429
    assert 1 <= error.retry_after <= 60
    assert error.message == (
        "Too many requests: this account allows 3 per minute. "
        f"Try again in {error.retry_after} seconds."
    )
    assert error.as_dict() == {
        "code": "rate_limited",
        "message": error.message,
        "retry_after": error.retry_after,
    }
    # Still refused on retry; someone else's account is not.
    assert refusal(account=account).code == "rate_limited"
    rate_limit_hit(account=account_of(make_user("bob"), requests_per_minute_per_account=3))


@pytest.mark.django_db
def test_keys_have_their_own_limit_and_share_their_accounts(make_user, storage):
    alice = make_user("alice")
    account = account_of(alice, requests_per_minute_per_account=3, requests_per_minute_per_key=2)
    first, _ = make_key(alice, account)
    second, _ = make_key(alice, account)

    rate_limit_hit(account=account, api_key=first)
    rate_limit_hit(account=account, api_key=first)
    over_key = refusal(account=account, api_key=first)
    assert "this API key allows 2 per minute" in over_key.message

    # The key's refusal did not use up the account: the second key gets the third slot.
    rate_limit_hit(account=account, api_key=second)
    over_account = refusal(account=account, api_key=second)
    assert "this account allows 3 per minute" in over_account.message
    assert "this account allows 3" in refusal(account=account).message

    # Another account is untouched.
    bob = make_user("bob")
    other = account_of(bob, requests_per_minute_per_account=3, requests_per_minute_per_key=2)
    bobs_key, _ = make_key(bob, other)
    rate_limit_hit(account=other, api_key=bobs_key)
    rate_limit_hit(account=other)


@pytest.mark.django_db
def test_the_deployment_default_applies_when_nothing_else_does(make_user, settings):
    settings.AGENT_RATE_LIMIT_PER_MINUTE = 2
    account = account_of(make_user())
    rate_limit_hit(account=account)
    rate_limit_hit(account=account)
    assert "allows 2 per minute" in refusal(account=account).message

    settings.AGENT_RATE_LIMIT_PER_MINUTE = 0  # no limit
    for _ in range(100):
        rate_limit_hit(account=account)


@pytest.mark.django_db
def test_an_api_client_over_the_limit_gets_429_with_retry_after(make_user, storage):
    user = make_user()
    account = account_of(user, requests_per_minute_per_key=2)
    _, raw_key = make_key(user, account)
    client = Client()

    # Requests that fail still count: a 404 took the server's time all the same.
    assert unknown_trace(client, raw_key).status_code == 404
    assert unknown_trace(client, raw_key).status_code == 404
    response = unknown_trace(client, raw_key)

    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert "this API key allows 2 per minute" in error["message"]
    assert response["Retry-After"] == str(error["details"]["retry_after"])
    assert 1 <= error["details"]["retry_after"] <= 60
    # A bad key is refused as such, not as rate limited.
    assert unknown_trace(client, "sk_bogus").status_code == 401


@pytest.mark.django_db
def test_signed_in_requests_count_against_the_account_too(make_user, storage):
    user = make_user()
    account = account_of(user, requests_per_minute_per_account=3)
    _, raw_key = make_key(user, account)
    browser = Client()
    browser.force_login(user)

    assert unknown_trace(browser).status_code == 404
    assert unknown_trace(browser).status_code == 404
    assert unknown_trace(Client(), raw_key).status_code == 404
    response = unknown_trace(browser)
    assert response.status_code == 429
    assert "this account allows 3 per minute" in response.json()["error"]["message"]
    assert unknown_trace(Client(), raw_key).status_code == 429

    other = make_user("bob")
    account_of(other, requests_per_minute_per_account=3)
    browser.force_login(other)
    assert unknown_trace(browser).status_code == 404


@pytest.mark.django_db
def test_a_parallel_burst_lets_exactly_the_limit_through(make_user, storage):
    account = account_of(make_user(), requests_per_minute_per_account=10)
    start = threading.Barrier(30)
    allowed, refused = [], []

    def request() -> None:
        start.wait()
        try:
            rate_limit_hit(account=account)
            allowed.append(1)
        except RateLimitExceeded:
            refused.append(1)

    threads = [threading.Thread(target=request) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(allowed), len(refused)) == (10, 20)


@pytest.mark.django_db(transaction=True)
async def test_chat_messages_count_but_cancel_and_resume_never_do(make_user):
    user = await database_sync_to_async(make_user)()
    await database_sync_to_async(account_of)(user, requests_per_minute_per_account=1)
    conversation = await database_sync_to_async(chat_services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()

    await socket.send_json_to({"type": "message", "content": "What is 2 + 2?"})
    first_run = await receive_until(socket, "run.completed")
    await socket.send_json_to({"type": "message", "content": "And 3 + 3?"})
    error = await socket.receive_json_from()
    assert error["type"] == "error" and error["code"] == "rate_limited"
    assert "this account allows 1 per minute" in error["message"]
    assert 1 <= error["retry_after"] <= 60

    # Over the limit, the user can still stop runs and read them again (a reconnecting
    # client resumes on a new socket).
    await socket.send_json_to({"type": "cancel"})
    assert (await socket.receive_json_from())["code"] == "no_active_run"
    await socket.disconnect()
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    await socket.send_json_to({"type": "resume", "run": first_run[0]["run"], "after_seq": 0})
    replayed = await receive_until(socket, "run.completed")
    assert replayed == first_run
    await socket.disconnect()


@pytest.mark.django_db
def test_requests_go_through_uncounted_when_redis_is_down(make_user, settings, caplog):
    # Nothing listens on port 1: every limiter call fails to connect.
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    account = account_of(make_user(), requests_per_minute_per_account=1)

    for _ in range(3):
        rate_limit_hit(account=account)

    assert "rate limiter unavailable" in caplog.text
