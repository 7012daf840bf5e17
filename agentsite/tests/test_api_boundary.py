"""ApiBoundaryMiddleware and api_body_limit: which requests the JSON API refuses for
their body, that every operation that can be refused declares it, that a browser app
can read the refusal, and that a body sent without a length is bounded while read."""

import asyncio

import pytest
from django.core.handlers.asgi import ASGIHandler
from django.test import Client

from agentsite.middleware import BODY_METHODS, api_body_limit
from agentsite.tests.test_auth import make_key

pytestmark = pytest.mark.django_db

ORIGIN = "https://app.example.com"


def test_every_operation_that_takes_a_body_declares_400_and_413():
    schema = Client().get("/api/openapi.json").json()
    operations = [
        (method, path, operation["responses"])
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method.upper() in BODY_METHODS
    ]
    assert operations
    for method, path, responses in operations:
        assert {"400", "413"} <= set(responses), (method, path)


def test_only_a_method_with_a_body_is_refused_for_its_size(make_user, settings):
    settings.AGENT_API_MAX_BODY_BYTES = 100
    _, raw_key = make_key(make_user())
    headers = {"X-API-Key": raw_key}
    # A GET does not declare 413 or 400: whatever body or length it says it has is ignored.
    for length in ("1000", "many"):
        got = Client().get("/api/v1/usage", headers=headers, CONTENT_LENGTH=length)
        assert got.status_code == 200, got.content
    refused = Client().post(
        "/api/v1/conversations",
        {"title": "x" * 200},
        content_type="application/json",
        headers=headers,
    )
    assert refused.status_code == 413
    assert refused.json()["error"]["code"] == "request_too_large"


def test_a_browser_app_on_an_allowed_origin_can_read_a_413(make_user, settings):
    settings.AGENT_API_MAX_BODY_BYTES = 100
    settings.CORS_ALLOWED_ORIGINS = [ORIGIN]
    _, raw_key = make_key(make_user())
    refused = Client().post(
        "/api/v1/conversations",
        {"title": "x" * 200},
        content_type="application/json",
        headers={"X-API-Key": raw_key, "Origin": ORIGIN},
    )
    assert refused.status_code == 413
    assert refused["Access-Control-Allow-Origin"] == ORIGIN


def _chunked_post(path: str, chunks: int, size: int):
    """An ASGI POST with no Content-Length, sent in `chunks` chunks of `size` bytes;
    how many of them the application asked for."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    sent = []
    read = 0
    done = asyncio.Event()

    async def receive():
        nonlocal read
        if read < chunks:
            read += 1
            return {"type": "http.request", "body": b"x" * size, "more_body": read < chunks}
        await done.wait()  # the client hangs up once it has the response
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    return scope, receive, send, sent, lambda: read


@pytest.mark.django_db(transaction=True)
async def test_a_chunked_body_over_the_limit_is_413_and_buffered_only_to_the_limit(settings):
    settings.AGENT_API_MAX_BODY_BYTES = 1000
    buffered = []

    class Handler(ASGIHandler):
        async def read_body(self, receive):
            body_file = await super().read_body(receive)
            buffered.append(len(body_file.read()))
            body_file.seek(0)
            return body_file

    scope, receive, send, sent, read = _chunked_post("/api/v1/conversations", 50, 100)
    await asyncio.wait_for(api_body_limit(Handler())(scope, receive, send), timeout=60)
    assert sent[0]["status"] == 413
    # Django held the limit and one chunk, not the 5000 bytes sent; the rest was drained.
    assert buffered == [1100]
    assert read() == 50


async def test_a_body_within_the_limit_and_other_paths_pass_untouched(settings):
    settings.AGENT_API_MAX_BODY_BYTES = 1000
    for path, chunks in (("/api/v1/conversations", 5), ("/login/", 50)):
        got = []

        async def app(scope, receive, send, got=got):
            while True:
                message = await receive()
                got.append(len(message["body"]))
                if not message["more_body"]:
                    return

        scope, receive, _, _, _ = _chunked_post(path, chunks, 100)
        await asyncio.wait_for(api_body_limit(app)(scope, receive, None), timeout=60)
        assert got == [100] * chunks
