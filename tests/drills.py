"""Fault drills against real processes: a server the test starts, kills and restarts
(`runserver`, as `make run` serves), and its own redis-server on a free port. The test
reads the server's SQLite file directly, as an operator would."""

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.conftest import ROOT, _free_port, _runserver, _server_env, _wait_until_up
from tests.servers import postgres_available

USERNAME = "drill"

_PREPARE = """
import json
import os
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.db import SessionStore
from django.core.management import call_command
from chat.services import conversation_create
call_command("migrate", interactive=False, verbosity=0)
user = get_user_model().objects.create_user("drill", password="drill-password-123")
session = SessionStore()
session[SESSION_KEY] = str(user.pk)
session[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
session[HASH_SESSION_KEY] = user.get_session_auth_hash()
session.create()
conversations = [
    str(conversation_create(owner=user).id)
    for _ in range(int(os.environ.get("DRILL_CONVERSATIONS", "1")))
]
print(json.dumps({"session": session.session_key, "conversations": conversations}))
"""


@dataclass
class Login:
    session: str
    conversation: str


def prepare(env: dict[str, str], *, conversations: int = 1) -> subprocess.Popen[bytes]:
    """Migrate the database `env` names, and make the drill's user, its session and
    `conversations` conversations of it: read them with `logins_read`."""
    return subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "shell",
            "--no-imports",
            "-c",
            _PREPARE,
        ],
        cwd=ROOT,
        env={**env, "DRILL_CONVERSATIONS": str(conversations)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def logins_read(preparing: subprocess.Popen[bytes]) -> list[Login]:
    """One login per conversation `prepare` made, all of the same browser session."""
    try:
        out, err = preparing.communicate(timeout=120)
    finally:
        preparing.kill()
    if preparing.returncode != 0:
        raise RuntimeError(f"Preparing the database failed:\n{err.decode()[-3000:]}")
    data = json.loads(out.decode().strip().splitlines()[-1])
    return [Login(session=data["session"], conversation=c) for c in data["conversations"]]


@asynccontextmanager
async def chat_socket(url: str, login: Login) -> AsyncIterator[ClientConnection]:
    """The chat WebSocket of the login's conversation at `url` (http://host:port), as
    the logged-in browser of that site."""
    async with connect(
        url.replace("http://", "ws://", 1) + f"/ws/chat/{login.conversation}/",
        additional_headers={"Cookie": f"sessionid={login.session}", "Origin": url},
        open_timeout=30,
    ) as socket:
        yield socket


class DrillServer:
    """One server process at a time on a fixed port and database, so it can be killed
    and started again where the clients expect it."""

    def __init__(self, workdir: Path, **env: str) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**_server_env(workdir), **env}
        self.log = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def prepare_and_start(self) -> Login:
        """Migrate, make the drill's user, session and conversation, and start the
        server meanwhile (it touches the database only once asked, after both)."""
        preparing = prepare(self.env)
        try:
            self._launch()
        finally:
            [login] = logins_read(preparing)
        assert self.process is not None
        _wait_until_up(self.url, self.process, self.log)
        return login

    def start(self) -> None:
        self._launch()
        assert self.process is not None
        _wait_until_up(self.url, self.process, self.log)

    def _launch(self) -> None:
        self.process = _runserver(self.env, self.port, self.log)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as a crash or the OOM killer."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.kill()

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.workdir / "db.sqlite3", timeout=30) as db:
            return db.execute(sql, params).fetchall()

    @asynccontextmanager
    async def socket(self, login: Login) -> AsyncIterator[ClientConnection]:
        """The chat WebSocket of the drill's conversation, as the logged-in browser."""
        async with chat_socket(self.url, login) as socket:
            yield socket


def uuid_hex(value: str) -> str:
    """How Django stores a UUID in SQLite."""
    return value.replace("-", "")


async def receive(socket: ClientConnection, wait: float = 30) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(socket.recv(), timeout=wait))


async def receive_until(
    socket: ClientConnection, event_type: str, wait: float = 60
) -> list[dict[str, Any]]:
    """Every frame up to and including the first of `event_type`, within `wait` seconds."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait
    while not frames or frames[-1]["type"] != event_type:
        frames.append(await receive(socket, max(deadline - time.monotonic(), 0.01)))
    return frames


async def resume_until_final(
    url: str, login: Login, run: str, *, after_seq: int
) -> list[dict[str, Any]]:
    """As the browser does: reconnect (again, while the servers recover), resume the run
    from the last event it drew, and read to its final event. Every frame of the run it
    drew, the final one last."""
    # Here, not at the top: the benchmarks import this module without Django's settings.
    from chat.event_schemas import FINAL_EVENT_TYPES

    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "no final event within 60 s"
        try:
            async with chat_socket(url, login) as socket:
                assert (await receive(socket))["type"] == "session"
                resume = {"type": "resume", "run": run, "after_seq": after_seq}
                await socket.send(json.dumps(resume))
                while True:
                    frame = await receive(socket)
                    if frame.get("run") != run:
                        continue
                    frames.append(frame)
                    after_seq = max(after_seq, frame["seq"])
                    if frame["type"] in FINAL_EVENT_TYPES:
                        return frames
        except (ConnectionClosed, InvalidHandshake, OSError):
            await asyncio.sleep(0.5)


class RedisServer:
    """A redis-server of the test's own on a free port, without persistence: a restart
    loses everything, as a Redis without AOF/RDB (or a new pod) does."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start within 30 s")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None


def redis_server_available() -> bool:
    return any(
        os.access(os.path.join(path, "redis-server"), os.X_OK)
        for path in os.environ.get("PATH", "").split(os.pathsep)
    )


def needs_postgres_and_redis_server(what: str) -> list[pytest.MarkDecorator]:
    """The marks of a module of drills on PostgreSQL and redis-servers of their own:
    without either it is skipped, saying loudly `what` did not run."""
    return [
        pytest.mark.postgres,
        pytest.mark.skipif(
            not postgres_available(),
            reason=f"PostgreSQL is NOT reachable on 127.0.0.1:5432: {what}",
        ),
        pytest.mark.skipif(
            not redis_server_available(), reason=f"redis-server is NOT installed: {what}"
        ),
    ]
