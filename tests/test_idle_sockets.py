"""Chat sockets on the Redis channel layer stay open while idle, on a busy machine too.

A real Daphne process serves the app with AGENT_REDIS_URL set (the tests' Redis database,
a throwaway SQLite file), and a real WebSocket client sits idle on it like a browser tab.
redis-py 8 reads with a 5 s socket timeout by default, exactly channels-redis's 5 s
blocking pop: every idle socket's receive timed out and Daphne closed it with 1011.
"""

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import ROOT, _free_port, _server_env, _wait_until_up
from tests.servers import REDIS_URL, redis_available

pytestmark = pytest.mark.skipif(
    not redis_available(),
    reason="REDIS TEST SKIPPED: Redis is NOT reachable on 127.0.0.1:6379, so idle sockets "
    "on the Redis channel layer were NOT tested",
)

IDLE_SECONDS = 20
APPLICATION = "agentsite.asgi:application"
CONVERSATIONS = 2  # one per test: a failed run in one must not block the other


@dataclass(frozen=True)
class RedisChatServer:
    ws_url: str
    origin: str
    session_cookie: str
    conversations: list[str]
    log: Path


def _prepare(env: dict[str, str]) -> tuple[str, list[str]]:
    """Migrate, then make a signed-in session and its conversations (one Django start-up)."""
    script = (
        "from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY\n"
        "from django.contrib.auth import get_user_model\n"
        "from django.contrib.sessions.backends.db import SessionStore\n"
        "from django.core.management import call_command\n"
        "from chat.services import conversation_create\n"
        "call_command('migrate', interactive=False, verbosity=0)\n"
        "user = get_user_model().objects.create_user('idle-tester')\n"
        "session = SessionStore()\n"
        "session[SESSION_KEY] = str(user.pk)\n"
        "session[BACKEND_SESSION_KEY] = 'django.contrib.auth.backends.ModelBackend'\n"
        "session[HASH_SESSION_KEY] = user.get_session_auth_hash()\n"
        "session.create()\n"
        f"ids = [str(conversation_create(owner=user).id) for _ in range({CONVERSATIONS})]\n"
        "print(session.session_key, *ids)\n"
    )
    prepared = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if prepared.returncode != 0:
        raise RuntimeError(f"Preparing the database failed:\n{prepared.stderr}")
    session_key, *conversations = prepared.stdout.split()[-1 - CONVERSATIONS :]
    return session_key, conversations


@pytest.fixture(scope="module")
def redis_chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisChatServer]:
    workdir = tmp_path_factory.mktemp("redis-chat-server")
    env = {**_server_env(workdir), "AGENT_REDIS_URL": REDIS_URL}
    session_key, conversations = _prepare(env)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), APPLICATION],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_up(url, server, log)
        yield RedisChatServer(
            ws_url=f"ws://127.0.0.1:{port}/ws/chat/",
            origin=url,
            session_cookie=session_key,
            conversations=conversations,
            log=log,
        )
    finally:
        server.kill()
        server.wait()


async def next_frame(socket: ClientConnection, server: RedisChatServer, wait: float) -> Any:
    try:
        return json.loads(await asyncio.wait_for(socket.recv(), wait))
    except ConnectionClosed as closed:
        pytest.fail(f"the server closed the socket ({closed}):\n{server.log.read_text()[-3000:]}")


async def idle_then_chat(server: RedisChatServer) -> None:
    conversation = server.conversations.pop()
    async with connect(
        f"{server.ws_url}{conversation}/",
        origin=server.origin,
        additional_headers={"Cookie": f"sessionid={server.session_cookie}"},
        ping_interval=None,  # a browser tab sends no pings: the socket is truly idle
    ) as socket:
        assert (await next_frame(socket, server, wait=30))["type"] == "session"
        with pytest.raises(TimeoutError):
            frame = await next_frame(socket, server, wait=IDLE_SECONDS)
            pytest.fail(f"an idle socket received {frame}")

        await socket.send(json.dumps({"type": "message", "content": "What is 17 * 23?"}))
        events = [await next_frame(socket, server, wait=60)]
        while events[-1]["type"] not in ("run.completed", "run.failed", "error"):
            events.append(await next_frame(socket, server, wait=60))

    assert events[-1]["type"] == "run.completed", events[-1]
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert "391" in "".join(event.get("text", "") for event in events if event["type"] == "token")
    assert "Traceback" not in server.log.read_text()


async def test_an_idle_socket_stays_open_and_gets_the_next_runs_events(
    redis_chat_server: RedisChatServer,
) -> None:
    await idle_then_chat(redis_chat_server)


async def test_an_idle_socket_stays_open_while_another_process_keeps_a_core_busy(
    redis_chat_server: RedisChatServer, busy_core: None
) -> None:
    await idle_then_chat(redis_chat_server)
