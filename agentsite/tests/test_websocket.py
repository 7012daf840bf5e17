"""Which pages may open a WebSocket: the site's own origin or a trusted one, compared
exactly (scheme, host and port), exactly as Django's CSRF check judges an HTTP Origin."""

import pytest
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.testing import WebsocketCommunicator
from django.middleware.csrf import CsrfViewMiddleware
from django.test import RequestFactory

from agentsite.asgi import application
from agentsite.websocket import SameOriginValidator
from chat import services
from conftest import session_cookie

PROXY_HTTPS = ("x-forwarded-proto", "https")


class Accept(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        await self.accept()


@pytest.fixture(autouse=True)
def site(settings):
    settings.ALLOWED_HOSTS = ["localhost", "127.0.0.1", "chat.example.com"]
    settings.CSRF_TRUSTED_ORIGINS = ["http://localhost:8080", "https://*.example.org"]
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")


async def socket_opens(origin: str | None, host: str, *extra: tuple[str, str]) -> bool:
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    headers += [(name.encode(), value.encode()) for name, value in extra]
    socket = WebsocketCommunicator(SameOriginValidator(Accept.as_asgi()), "/", headers=headers)
    connected, _ = await socket.connect()
    await socket.disconnect()
    return connected


def csrf_accepts(origin: str, host: str, *extra: tuple[str, str]) -> bool:
    meta = {"HTTP_" + name.upper().replace("-", "_"): value for name, value in extra}
    request = RequestFactory().post("/", HTTP_ORIGIN=origin, HTTP_HOST=host, **meta)
    return CsrfViewMiddleware(lambda request: None)._origin_verified(request)


CASES = [
    # (origin, Host header, extra headers, opens)
    ("http://localhost", "localhost", (), True),
    ("http://localhost:8000", "localhost:8000", (), True),
    ("http://127.0.0.1:9999", "127.0.0.1:8000", (), False),  # another port, same host
    ("http://127.0.0.1:9999", "localhost:8000", (), False),
    ("http://localhost:8000", "localhost:9000", (), False),
    ("https://localhost", "localhost", (), False),  # another scheme
    ("http://localhost", "localhost", (PROXY_HTTPS,), False),  # the site is https
    ("https://chat.example.com", "chat.example.com", (PROXY_HTTPS,), True),
    ("https://chat.example.com", "chat.example.com", (), False),
    ("http://evil.example.net", "evil.example.net", (), False),  # not an allowed host
    ("http://localhost:8080", "localhost", (), True),  # CSRF_TRUSTED_ORIGINS
    ("http://localhost:8081", "localhost", (), False),
    ("https://a.example.org", "chat.example.com", (), True),  # https://*.example.org
    ("https://example.org", "chat.example.com", (), True),
    ("http://a.example.org", "chat.example.com", (), False),
    ("https://a.example.org:8443", "chat.example.com", (), False),
    ("null", "localhost", (), False),
    ("http://[::1", "localhost", (), False),
]


@pytest.mark.parametrize(("origin", "host", "extra", "opens"), CASES)
async def test_a_socket_opens_only_from_an_exact_origin(origin, host, extra, opens):
    assert await socket_opens(origin, host, *extra) is opens


@pytest.mark.parametrize(("origin", "host", "extra", "opens"), CASES)
def test_the_socket_judges_an_origin_as_django_csrf_does(origin, host, extra, opens):
    assert csrf_accepts(origin, host, *extra) is opens


async def test_a_socket_without_an_origin_is_refused():
    assert await socket_opens(None, "localhost") is False


@pytest.mark.django_db(transaction=True)
async def test_a_logged_in_users_socket_from_another_port_is_refused(make_user):
    """The finding: any port on an allowed host could open an authenticated socket."""
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    cookie = await database_sync_to_async(session_cookie)(user)

    async def connect(origin: bytes) -> WebsocketCommunicator:
        headers = [
            (b"origin", origin),
            (b"host", b"127.0.0.1:8000"),
            (b"cookie", f"sessionid={cookie}".encode()),
        ]
        return WebsocketCommunicator(application, f"/ws/chat/{conversation.id}/", headers)

    stranger = await connect(b"http://127.0.0.1:9999")
    assert (await stranger.connect())[0] is False
    own = await connect(b"http://127.0.0.1:8000")
    assert (await own.connect())[0] is True
    assert (await own.receive_json_from())["type"] == "session"
    await own.disconnect()
