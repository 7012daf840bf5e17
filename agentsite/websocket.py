"""The WebSocket edge: which pages may open a socket, and how the server ends a bad one."""

from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain


class SameOriginValidator:
    """Lets a socket open only from the site's own origin or a `CSRF_TRUSTED_ORIGINS`
    entry, compared exactly (scheme, host and port) as Django's CSRF check compares an
    HTTP request's Origin. Channels' AllowedHostsOriginValidator compares host names
    only, so any port or scheme on an allowed host (`http://127.0.0.1:9999`, another
    program on the same machine) could open a socket carrying the user's session.

    A refused socket is closed before it is accepted: the browser sees HTTP 403."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        if _origin_allowed(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)


def _origin_allowed(scope: dict[str, Any]) -> bool:
    headers = {name: value.decode("latin1") for name, value in scope.get("headers", [])}
    origin = headers.get(b"origin")
    if origin is None:
        # Browsers always send Origin on a WebSocket handshake.
        return False
    host = headers.get(b"host", "")
    domain, _ = split_domain_port(host)
    allowed_hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed_hosts:
        allowed_hosts = [".localhost", "127.0.0.1", "[::1]"]  # as HttpRequest.get_host()
    if domain and validate_host(domain, allowed_hosts):
        scheme = "https" if _is_secure(scope, headers) else "http"
        if origin == f"{scheme}://{host}":
            return True
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in trusted:
        return True
    # "https://*.example.com" trusts every subdomain, on that scheme only (as in Django).
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    return any(
        parsed.scheme == pattern.scheme
        and is_same_domain(parsed.netloc, pattern.netloc.lstrip("*"))
        for pattern in (urlsplit(entry) for entry in trusted if "*" in entry)
    )


def _is_secure(scope: dict[str, Any], headers: dict[bytes, str]) -> bool:
    """HttpRequest.is_secure() for a WebSocket: the proxy's header when
    SECURE_PROXY_SSL_HEADER names one, else the connection's own scheme."""
    if settings.SECURE_PROXY_SSL_HEADER:
        meta_name, secure_value = settings.SECURE_PROXY_SSL_HEADER
        name = meta_name.removeprefix("HTTP_").replace("_", "-").lower().encode("latin1")
        if name in headers:
            return headers[name].split(",", 1)[0].strip() == secure_value
    return bool(scope.get("scheme") == "wss")


def daphne_fail_with_close_frames() -> None:
    """Make Daphne end a socket it must fail with a close frame that says why, instead
    of dropping the TCP connection: 1009 for a message over its size limit (1 MiB
    unless `--websocket-max-message-size` says otherwise), 1007 for a text frame that is
    not UTF-8, 1002 for a protocol error.

    Such a frame never reaches the application, so no error frame can answer it; RFC 6455
    (7.1.7) says the server SHOULD send a close frame then. Autobahn, Daphne's WebSocket
    engine, drops the connection instead unless its `failByDrop` option is off, and
    Daphne offers no setting for it, so every factory Daphne builds gets it off here.
    Called before the server starts (agentsite.asgi is imported first)."""
    from daphne.ws_protocol import WebSocketFactory

    reset = WebSocketFactory.resetProtocolOptions
    if getattr(reset, "fails_with_close_frames", False):
        return

    def reset_protocol_options(factory: WebSocketFactory) -> None:
        reset(factory)
        factory.failByDrop = False

    reset_protocol_options.fails_with_close_frames = True  # type: ignore[attr-defined]
    WebSocketFactory.resetProtocolOptions = reset_protocol_options  # type: ignore[method-assign]
