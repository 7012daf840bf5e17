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

import redis
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import ROOT, _free_port, _runserver, _server_env, _wait_until_up

USERNAME = "drill"

_PREPARE = """
import json
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
conversation = conversation_create(owner=user)
print(json.dumps({"session": session.session_key, "conversation": str(conversation.id)}))
"""


@dataclass
class Login:
    session: str
    conversation: str


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
        preparing = subprocess.Popen(
            [sys.executable, "manage.py", "shell", "--no-imports", "-c", _PREPARE],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            self._launch()
            out, err = preparing.communicate(timeout=120)
        finally:
            preparing.kill()
        if preparing.returncode != 0:
            raise RuntimeError(f"Preparing the database failed:\n{err.decode()[-3000:]}")
        assert self.process is not None
        _wait_until_up(self.url, self.process, self.log)
        data = json.loads(out.decode().strip().splitlines()[-1])
        return Login(session=data["session"], conversation=data["conversation"])

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
        async with connect(
            f"ws://127.0.0.1:{self.port}/ws/chat/{login.conversation}/",
            additional_headers={"Cookie": f"sessionid={login.session}", "Origin": self.url},
            open_timeout=30,
        ) as socket:
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
