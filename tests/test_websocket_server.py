"""Hostile input against a real Daphne server (the one `make run` starts) on PostgreSQL:
what only the real server does (its frame size limit, UTF-8 checks and origin handshake)
and what only PostgreSQL refuses (NUL in text). One server for the module: on SQLite, with
the PostgreSQL-only tests skipped loudly, when PostgreSQL is down."""

import asyncio
import http.cookiejar
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import (
    PASSWORD,
    USERNAME,
    _prepare_database,
    _server_env,
    serving,
)
from tests.servers import postgres_available, postgres_database

# Daphne's default limit on one incoming WebSocket message (--websocket-max-message-size).
DAPHNE_MAX_MESSAGE_BYTES = 1024 * 1024
BACKEND = "postgresql" if postgres_available() else "sqlite"


@dataclass
class Server:
    backend: str
    url: str
    log: Path
    opener: urllib.request.OpenerDirector
    cookies: http.cookiejar.CookieJar
    conversation: str

    @property
    def origin(self) -> str:
        return self.url

    def csrf_token(self) -> str:
        return next(c.value for c in self.cookies if c.name == "csrftoken")

    def session_cookie(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.cookies)

    def post(self, path: str, fields: dict[str, str]) -> tuple[int, str]:
        data = urllib.parse.urlencode({**fields, "csrfmiddlewaretoken": self.csrf_token()})
        request = urllib.request.Request(
            self.url + path, data=data.encode(), headers={"Referer": self.url + path}
        )
        try:
            with self.opener.open(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def socket(self, *, origin: str | None = None) -> connect:
        return connect(
            self.url.replace("http://", "ws://") + f"/ws/chat/{self.conversation}/",
            origin=origin or self.origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": self.session_cookie()},
            compression=None,  # the frames cross the wire at their full size
            max_size=None,
            proxy=None,
            open_timeout=30,
        )


def start_server(workdir: Path, database_url: str) -> Iterator[Server]:
    env = {**_server_env(workdir), "DATABASE_URL": database_url}
    log = workdir / "server.log"
    preparing = _prepare_database(env)
    prepared, _ = preparing.communicate(timeout=180)
    assert preparing.returncode == 0, prepared.decode()[-3000:]
    with serving(env, log) as url:
        yield log_in(url, log)


def log_in(url: str, log: Path) -> Server:
    cookies = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(cookies))
    with opener.open(url + "/login/", timeout=30) as response:
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', response.read().decode())
    assert token is not None
    fields = {"username": USERNAME, "password": PASSWORD, "csrfmiddlewaretoken": token[1]}
    login = urllib.request.Request(
        url + "/login/",
        data=urllib.parse.urlencode(fields).encode(),
        headers={"Referer": url + "/login/"},
    )
    with opener.open(login, timeout=30) as response:
        # The login lands on the user's newest conversation.
        conversation = re.search(r"/c/([0-9a-f-]{36})/", response.url)
    assert conversation is not None, response.url
    return Server(BACKEND, url, log, opener, cookies, conversation[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp(f"websocket-{BACKEND}")
    if BACKEND == "sqlite":
        yield from start_server(workdir, f"sqlite:///{workdir / 'db.sqlite3'}")
        return
    with postgres_database("agentsite_frames") as database_url:
        yield from start_server(workdir, database_url)


def require_postgres(server: Server) -> None:
    if server.backend != "postgresql":
        pytest.skip("PostgreSQL is NOT reachable on 127.0.0.1:5432: NUL-in-text check untested")


@pytest.fixture
def no_tracebacks(server: Server) -> Iterator[None]:
    """Whatever the test sends, the server logs no traceback."""
    logged_before = server.log.stat().st_size
    yield
    with server.log.open("rb") as log:
        log.seek(logged_before)
        logged = log.read().decode(errors="replace")
    assert "Traceback" not in logged, logged[-4000:]


async def opened(server: Server) -> ClientConnection:
    socket = await server.socket()
    assert (await reply(socket))["type"] == "session"
    return socket


async def reply(socket: ClientConnection) -> dict:
    return json.loads(await asyncio.wait_for(socket.recv(), timeout=30))


async def still_usable(socket: ClientConnection) -> None:
    # Nothing is running, so a cancel is answered at once, without starting a run.
    await socket.send(json.dumps({"type": "cancel"}))
    assert (await reply(socket))["code"] == "no_active_run"


async def closed_with(socket: ClientConnection) -> int | None:
    """The code of the close frame the server sent (1006: it dropped the connection)."""
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(socket.recv(), timeout=30)
    return socket.close_code


@pytest.mark.usefixtures("no_tracebacks")
@pytest.mark.parametrize(
    ("content", "code"),
    [
        ("a\u0000b", "invalid_message"),  # PostgreSQL text cannot hold NUL
        ("lone \ud800", "invalid_message"),  # sent escaped: "\ud800"
        ("x" * 100_000, "frame_too_large"),  # over the app's limit, under Daphne's
    ],
)
def test_unstorable_or_oversized_messages_get_an_error_frame(server, content, code):
    async def drive() -> None:
        async with await opened(server) as socket:
            await socket.send(json.dumps({"type": "message", "content": content}))
            error = await reply(socket)
            assert (error["type"], error["code"]) == ("error", code), error
            await still_usable(socket)

    asyncio.run(drive())


@pytest.mark.usefixtures("no_tracebacks")
def test_a_nul_in_a_title_is_refused_with_a_message_not_a_500(server):
    require_postgres(server)
    status, page = server.post(f"/c/{server.conversation}/rename/", {"title": "a\u0000b"})
    assert status == 200, page[-2000:]  # the redirect back to the conversation, followed
    assert "cannot be stored" in page
    status, page = server.post(f"/c/{server.conversation}/rename/", {"title": "Renamed"})
    assert status == 200 and "Renamed" in page


@pytest.mark.usefixtures("no_tracebacks")
def test_a_message_over_the_servers_limit_closes_the_socket_with_1009(server):
    """Daphne refuses to read a message over 1 MiB (so no error frame can answer it); it
    now says so with close code 1009 (Message Too Big) instead of dropping the TCP
    connection."""

    async def drive() -> int | None:
        async with await opened(server) as socket:
            await socket.send("x" * (DAPHNE_MAX_MESSAGE_BYTES + 1))
            return await closed_with(socket)

    assert asyncio.run(drive()) == 1009


@pytest.mark.usefixtures("no_tracebacks")
def test_a_text_frame_that_is_not_utf8_closes_the_socket_with_1007(server):
    async def drive() -> int | None:
        async with await opened(server) as socket:
            await socket.send(b'{"type": "message", "content": "\xed\xa0\x80"}', text=True)
            return await closed_with(socket)

    assert asyncio.run(drive()) == 1007


@pytest.mark.usefixtures("no_tracebacks")
def test_a_page_on_another_port_cannot_open_a_socket(server):
    async def drive() -> None:
        host = urllib.parse.urlsplit(server.url).hostname
        for origin in (f"http://{host}:9999", server.url.replace("http://", "https://")):
            with pytest.raises(InvalidStatus) as refused:
                await server.socket(origin=origin)
            assert refused.value.response.status_code == 403
        async with await opened(server) as socket:
            await still_usable(socket)

    asyncio.run(drive())


@pytest.mark.usefixtures("no_tracebacks")
def test_a_session_cookie_with_a_nul_is_no_session_not_a_500(server):
    """Django unquotes `"\\000"` in a quoted cookie; PostgreSQL refused the lookup."""
    require_postgres(server)
    cookie = 'sessionid="abcdefgh\\000ijklmnop"'
    request = urllib.request.Request(server.url + "/login/", headers={"Cookie": cookie})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200

    async def drive() -> int | None:
        async with connect(
            server.url.replace("http://", "ws://") + f"/ws/chat/{server.conversation}/",
            origin=server.origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": cookie},
            proxy=None,
        ) as socket:
            return await closed_with(socket)

    assert asyncio.run(drive()) == 4401  # not logged in
