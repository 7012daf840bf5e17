"""Sessions: read from the cache, written through to the database, and refused when the
cookie cannot be a session key."""

import pytest
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from agentsite.sessions import SessionStore

pytestmark = pytest.mark.django_db


def test_a_signed_in_page_reads_its_session_without_a_query(make_user):
    browser = Client()
    browser.force_login(make_user())
    key = browser.cookies["sessionid"].value

    with CaptureQueriesContext(connection) as queries:
        session = SessionStore(session_key=key)
        assert session.get("_auth_user_id")
    assert not queries.captured_queries
    # Written through: every instance, and this one after a restart, still has it.
    assert Session.objects.filter(session_key=key).exists()


def test_a_session_is_gone_at_once_when_its_user_logs_out(make_user):
    browser = Client()
    browser.force_login(make_user())
    key = browser.cookies["sessionid"].value
    login = reverse("login")
    assert not browser.get(reverse("chat:index"))["Location"].startswith(login)

    browser.post(reverse("logout"))

    stolen = Client()
    stolen.cookies["sessionid"] = key
    assert stolen.get(reverse("chat:index"))["Location"].startswith(login)


def test_a_cookie_that_cannot_be_a_session_key_reaches_neither_cache_nor_database():
    with CaptureQueriesContext(connection) as queries:
        session = SessionStore(session_key="abcdefgh\x00ijklmnop")
        assert session.session_key is None and not session.items()
    assert not queries.captured_queries
