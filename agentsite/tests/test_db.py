"""SQLite connections stay open on the threads that live on, not on a request's."""

from typing import Any

import pytest
from channels.testing import HttpCommunicator
from django.db import connection
from django.db.backends.signals import connection_created

from agentsite.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


async def test_an_http_request_closes_the_connection_its_thread_opened(monkeypatch) -> None:
    assert connection.vendor == "sqlite"
    # As deployed (the test settings close every connection after use); every thread's
    # connection reads this dict when it opens.
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", None)
    opened: list[Any] = []

    def record(sender: Any, connection: Any, **_: Any) -> None:
        opened.append(connection)

    connection_created.connect(record)
    try:
        request = HttpCommunicator(application, "GET", "/readyz", headers=[(b"host", b"localhost")])
        response = await request.get_response()
        await request.wait()  # the request ends after its response is sent
    finally:
        connection_created.disconnect(record)

    assert response["status"] == 200
    assert opened, "the readiness probe queries the database"
    # The request's thread is gone: a connection left open would wait for the garbage
    # collector, holding its file.
    assert all(wrapper.connection is None for wrapper in opened)
