"""How much memory does the server hold idle, and per open conversation?

    .venv/bin/python benchmarks/server_memory.py [--config sqlite|postgres] [--sockets 100,300]

Serves the app as a deployment does (`python -m agentsite.serve`, DEBUG off, the offline
model without token delay) on a throwaway database: SQLite files in a temporary
directory (the embedded defaults: in-memory channel layer, cache and event log), or, with
`--config postgres`, a fresh PostgreSQL database `agentsite_bench_<random>` on
127.0.0.1:5432 and a redis-server of its own on a free port (both removed at the end).

It reads the server's resident memory (VmRSS) after one finished turn (idle), then opens
WebSockets one conversation each, runs one turn on each (10 at a time) and keeps them
open: the memory at each total in `--sockets`, and its growth per conversation.
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"
AT_ONCE = 10


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def _postgres() -> Iterator[str]:
    import psycopg

    name = f"agentsite_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def _redis() -> Iterator[str]:
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait()


def _prepare(env: dict[str, str], conversations: int) -> tuple[str, list[str]]:
    """Migrate; one user without a plan (no quotas), signed in, with its conversations."""
    script = (
        "from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY\n"
        "from django.contrib.auth import get_user_model\n"
        "from django.contrib.sessions.backends.db import SessionStore\n"
        "from django.core.management import call_command\n"
        "from billing.services import account_for_user\n"
        "from chat.services import conversation_create\n"
        "call_command('migrate', interactive=False, verbosity=0)\n"
        "user = get_user_model().objects.create_user('memory-bench')\n"
        "account = account_for_user(user_id=user.pk)\n"
        "account.plan = None\n"
        "account.save(update_fields=['plan'])\n"
        "session = SessionStore()\n"
        "session[SESSION_KEY] = str(user.pk)\n"
        "session[BACKEND_SESSION_KEY] = 'django.contrib.auth.backends.ModelBackend'\n"
        "session[HASH_SESSION_KEY] = user.get_session_auth_hash()\n"
        "session.create()\n"
        f"ids = [str(conversation_create(owner=user).id) for _ in range({conversations})]\n"
        "print(session.session_key, *ids)\n"
    )
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    session_key, *ids = done.stdout.split()[-1 - conversations :]
    return session_key, ids


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Client:
    def __init__(self, port: int, session_key: str) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws/chat/"
        self.origin = Origin(f"http://127.0.0.1:{port}")
        self.session_key = session_key

    async def open_with_turn(self, conversation: str) -> ClientConnection:
        socket = await connect(
            f"{self.url}{conversation}/",
            origin=self.origin,
            additional_headers={"Cookie": f"sessionid={self.session_key}"},
            ping_interval=None,
            max_queue=None,
        )
        assert json.loads(await socket.recv())["type"] == "session"
        await socket.send(json.dumps({"type": "message", "content": "What is 17 * 23?"}))
        while True:
            event = json.loads(await asyncio.wait_for(socket.recv(), 120))
            if event["type"] in ("run.completed", "run.failed", "error"):
                break
        if event["type"] != "run.completed":
            raise RuntimeError(f"turn failed: {event}")
        return socket


async def _measure(
    pid: int, client: Client, conversations: list[str], totals: list[int]
) -> list[dict[str, float]]:
    # The first turn loads what a run needs (the graph, the checkpointer); its socket closes.
    first = await client.open_with_turn(conversations.pop())
    await first.close()
    await asyncio.sleep(2)
    idle = rss_mib(pid)
    rows = [{"sockets": 0, "rss_mib": round(idle, 1)}]
    sockets: list[ClientConnection] = []
    limit = asyncio.Semaphore(AT_ONCE)

    async def one(conversation: str) -> None:
        async with limit:
            sockets.append(await client.open_with_turn(conversation))

    for total in totals:
        await asyncio.gather(*(one(conversations.pop()) for _ in range(total - len(sockets))))
        await asyncio.sleep(2)
        rss = rss_mib(pid)
        rows.append(
            {
                "sockets": total,
                "rss_mib": round(rss, 1),
                "mib_per_conversation": round((rss - idle) / total, 3),
            }
        )
    for each in sockets:
        await each.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--sockets", default="100,300")
    args = parser.parse_args()
    totals = sorted(int(n) for n in args.sockets.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="agentsite-memory-"))
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AGENT_", "DATABASE_", "DJANGO_"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE="agentsite.settings",
        AGENTSITE_READ_DOTENV="false",
        DEBUG="false",
        SECRET_KEY="server-memory-benchmark-" + uuid.uuid4().hex + uuid.uuid4().hex,
        ALLOWED_HOSTS="127.0.0.1",
        USE_X_FORWARDED_PROTO="false",
        LOG_LEVEL="WARNING",
        AGENT_MODEL="offline",
        AGENT_OFFLINE_TOKEN_DELAY="0",
        AGENT_RATE_LIMIT_PER_MINUTE="0",
        DATABASE_URL=f"sqlite:///{workdir / 'db.sqlite3'}",
        AGENT_CHECKPOINT_SQLITE_PATH=str(workdir / "checkpoints.sqlite3"),
    )
    with contextlib_for(args.config) as (database_url, redis_url):
        if database_url:
            env["DATABASE_URL"] = database_url
        if redis_url:
            env["AGENT_REDIS_URL"] = redis_url
        session_key, conversations = _prepare(env, totals[-1] + 1)
        port = _free_port()
        log = workdir / "server.log"
        with log.open("wb") as output:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agentsite.serve",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "agentsite.asgi:application",
                ],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_until_up(port, server, log)
            rows = asyncio.run(
                _measure(server.pid, Client(port, session_key), conversations, totals)
            )
            print(json.dumps({"config": args.config, "rows": rows}))
        finally:
            server.kill()
            server.wait()
            shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def contextlib_for(config: str) -> Iterator[tuple[str, str]]:
    if config == "sqlite":
        yield "", ""
        return
    with _postgres() as database_url, _redis() as redis_url:
        yield database_url, redis_url


def _wait_until_up(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer:\n{log.read_text()[-4000:]}")


if __name__ == "__main__":
    main()
