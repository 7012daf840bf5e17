"""What does one chat turn cost Agentsite, next to the bare pattern (issue 9)?

    .venv/bin/python benchmarks/turn_cost.py                       # both configs, unpaced
    .venv/bin/python benchmarks/turn_cost.py --config sqlite --turns 400 --concurrency 8
    .venv/bin/python benchmarks/turn_cost.py --paced --concurrency 100 300

Run from the root of a checkout: it serves the checkout it lives in. In one run, per
configuration, it serves

- Agentsite as the image does (`python -m agentsite.serve`, i.e. Daphne, DEBUG off), to
  real WebSocket clients, each with a conversation of its own ("New chat"), signed in
  as one of `--users` users who logged in through the login form (session cookie);
- the bare pattern (benchmarks/fastapi_baseline.py: FastAPI + SSE under uvicorn, the same
  graph and offline model, LangGraph's in-memory checkpointer), to streaming HTTP clients;

and drives both with the same closed loop of turns of the same kind: "What is 17 * 23?",
which the offline model answers with one calculator call and then a streamed answer.
Both servers are up at once, pinned to core 1; this process (the load generator) is on
core 0. They take the load in turns (`--rounds` windows each, alternating), so what
else the machine does meanwhile falls on both alike: compare the ratio.

Configurations: `sqlite` (the embedded defaults: SQLite, in-memory channel layer, cache
and event log; a throwaway directory) and `postgres` (a throwaway database on the shared
PostgreSQL at 127.0.0.1:5432, and a redis-server of this run's own on a free port).

Measured per server: server CPU per turn (utime+stime of the server's process tree over
the measured windows, after a warm-up, from /proc), turns/s, turn latency and time to
first token (from sending the message to the first token frame or SSE event), errors;
idle RSS (after one turn) and RSS per open conversation. For `postgres` also the CPU of
the database backends serving the run's database, and of the run's redis-server. With
`--paced` the offline model waits AGENT_OFFLINE_TOKEN_DELAY (0.05 s) before each chunk
after its first, every client sends one turn per round at the same moment, and
latencies are also shown over the ideal: what those waits alone take (worked out from
the offline model itself, printed under the table). `--profile DIR` samples the
Agentsite server with py-spy during its measured windows (benchmarks/profile_summary.py
summarizes the file).

What is approximate: the machine is shared, so absolute numbers move between runs (the
"others' CPU % on the server's core" row says how much); CPU per turn includes the
server's idle work during the windows (lease heartbeats, 0.3 s settle after each
window); PostgreSQL CPU misses what a backend spends after its last 20 ms sample before
it exits (the "new PG sessions/turn" row says how many such backends there were); RSS
per conversation is a difference of two RSS readings, allocator slack included. Rate
limiting stays on with a ceiling the load cannot reach (AGENT_RATE_LIMIT_PER_MINUTE),
and each user's concurrent-run quota admits its share of the clients.
"""

import argparse
import asyncio
import contextlib
import http.cookiejar
import json
import math
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

from tests.conftest import _free_port, _server_env  # noqa: E402
from tests.drills import RedisServer  # noqa: E402
from tests.servers import postgres_database  # noqa: E402

PROMPT = "What is 17 * 23?"
PASSWORD = "bench-password-not-secret-1"
SERVER_CORE = 1
LOADGEN_CORE = 0
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# Agentsite's final events (chat/lifecycle.py FINAL_EVENTS): a turn ends with one.
FINAL_EVENTS = {
    "run.completed",
    "run.failed",
    "run.cancelled",
    "run.limit_reached",
    "run.budget_exceeded",
    "run.interrupted",
}
TURN_TIMEOUT = 120.0

_children: list[subprocess.Popen[bytes]] = []


# --- processes -------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) the process has used so far, all its threads."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants now alive."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(_stat_fields(int(entry))[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            parents.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def core_busy(core: int) -> float:
    """Seconds core `core` has spent busy (not idle or waiting on I/O), all processes."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / TICK
    return 0.0


def tree_cpu(pid: int) -> float:
    return sum(process_cpu(p) for p in process_tree(pid))


def tree_rss_mib(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
    return total / 2**20


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until `url` answers 200. Generous: on a busy shared machine Django alone can take
    half a minute to import."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within 180 s:\n{log.read_text()[-3000:]}")


def agentsite_command(port: int) -> list[str]:
    """Agentsite as the image serves it: Daphne with the app's access log."""
    return [
        sys.executable,
        "-m",
        "agentsite.serve",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "agentsite.asgi:application",
    ]


def fastapi_command(port: int) -> list[str]:
    """The bare pattern (benchmarks/fastapi_baseline.py) under uvicorn."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks.fastapi_baseline:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def pinned(command: list[str], core: int) -> list[str]:
    return ["taskset", "-c", str(core), *command] if shutil.which("taskset") else command


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    _children.append(process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            # After a run Daphne may not exit on SIGTERM (aiosqlite's non-daemon thread).
            process.kill()
            process.wait()
    if process in _children:
        _children.remove(process)


def stop_all_children() -> None:
    for process in list(_children):
        stop(process)


# --- what the offline model's waits alone take -------------------------------------------


IDEAL_SCRIPT = """
import json, sys
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from chat.agent.offline_model import OfflineChatModel
from chat.agent.tools import TOOLS
tools = [convert_to_openai_tool(t) for t in TOOLS]
model = OfflineChatModel()
human = [HumanMessage(PROMPT_HERE)]
first = list(model._chunks(human, tools, None))
calls = [
    {"name": c["name"], "args": json.loads(c["args"]), "id": c["id"]}
    for c in first[0].tool_call_chunks
]
results = [
    ToolMessage(next(t for t in TOOLS if t.name == c["name"]).invoke(c["args"]),
                tool_call_id=c["id"], name=c["name"])
    for c in calls
]
second = list(model._chunks([*human, AIMessage("", tool_calls=calls), *results], tools, None))
print(json.dumps({"tool_calls": len(calls), "first_call_chunks": len(first),
                  "answer_chunks": len(second),
                  "answer_tokens": sum(1 for c in second if c.content)}))
"""


@dataclass
class Ideal:
    delay: float
    first_call_chunks: int
    answer_chunks: int
    answer_tokens: int

    @property
    def ttft(self) -> float:
        # The model sleeps before every chunk but the first of each call: the tool call
        # call's chunks after its first, then the answer's first token comes at once.
        return self.delay * (self.first_call_chunks - 1)

    @property
    def turn(self) -> float:
        return self.delay * (self.first_call_chunks - 1 + self.answer_chunks - 1)

    def explain(self) -> str:
        before_answer = self.first_call_chunks - 1
        return (
            f"ideal = token delay {self.delay * 1000:.0f} ms x the model's waits: TTFT "
            f"{before_answer} (the tool-call reply's {self.first_call_chunks} chunks - 1) = "
            f"{self.ttft * 1000:.0f} ms; turn {before_answer} + {self.answer_chunks - 1} (the "
            f"answer's {self.answer_tokens} tokens + its usage chunk - 1) = "
            f"{self.turn * 1000:.0f} ms"
        )


def ideal_for(env: dict[str, str], delay: float) -> Ideal:
    done = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "shell",
            "--no-imports",
            "-c",
            IDEAL_SCRIPT.replace("PROMPT_HERE", repr(PROMPT)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Ideal(
        delay=delay,
        first_call_chunks=data["first_call_chunks"],
        answer_chunks=data["answer_chunks"],
        answer_tokens=data["answer_tokens"],
    )


# --- the two servers -------------------------------------------------------------------


PREPARE_SCRIPT = """
from django.contrib.auth import get_user_model
from django.core.management import call_command
from billing.services import account_for_user
call_command("migrate", interactive=False, verbosity=0)
for index in range({users}):
    user = get_user_model().objects.create_user(f"bench{{index}}", password={password!r})
    # Several clients share a user: its plan's concurrent-run quota must admit them all.
    account = account_for_user(user_id=user.pk)
    account.concurrent_runs = {per_user}
    account.save()
print("prepared")
"""


@dataclass
class Backend:
    """Where a configuration keeps its data, and the extra processes it costs."""

    name: str
    env: dict[str, str]
    database: str | None = None  # the PostgreSQL database name, to find its backends
    redis: RedisServer | None = None

    def run_row(self, run_id: str) -> str:
        """What the database says of a run (for a turn that failed)."""
        columns = ("status", "started_at", "finished_at", "error_code", "event_seq")
        query = f"SELECT {', '.join(columns)} FROM chat_run WHERE id = "
        if self.database:
            with psycopg.connect(self.env["DATABASE_URL"]) as db:
                row = db.execute(query + "%s", (run_id,)).fetchone()
        else:
            path = self.env["DATABASE_URL"].removeprefix("sqlite:///")
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as lite:
                row = lite.execute(query + "?", (run_id.replace("-", ""),)).fetchone()
        found = "missing" if row is None else dict(zip(columns, map(str, row), strict=True))
        return f"run {run_id} in the database: {found}"


@dataclass
class TurnResult:
    ok: bool
    started: float
    ttft: float | None = None
    latency: float | None = None
    error: str | None = None
    run: str | None = None  # Agentsite's run id, to look the run up when a turn fails


class AgentsiteClient:
    """A logged-in browser's chat socket on a conversation of its own."""

    def __init__(self, port: int, cookie: str, conversation: str) -> None:
        self.port = port
        self.cookie = cookie
        self.conversation = conversation
        self.socket: ClientConnection | None = None

    async def open(self) -> None:
        self.socket = await connect(
            f"ws://127.0.0.1:{self.port}/ws/chat/{self.conversation}/",
            origin=f"http://127.0.0.1:{self.port}",  # type: ignore[arg-type]
            additional_headers={"Cookie": self.cookie},
            compression=None,
            max_size=None,
            proxy=None,
            open_timeout=120,
            ping_interval=None,
        )
        frame = json.loads(await asyncio.wait_for(self.socket.recv(), timeout=120))
        if frame.get("type") != "session":
            raise RuntimeError(f"expected a session frame, got {frame}")

    async def turn(self) -> TurnResult:
        assert self.socket is not None
        started = time.perf_counter()
        result = TurnResult(ok=False, started=started)
        await self.socket.send(json.dumps({"type": "message", "content": PROMPT}))
        deadline = started + TURN_TIMEOUT
        seen: list[str] = []  # what came, to tell where a turn that never ended stopped
        while True:
            try:
                text = await asyncio.wait_for(self.socket.recv(), deadline - time.perf_counter())
            except TimeoutError:
                result.error = f"no final event within {TURN_TIMEOUT:.0f} s; frames seen: " + (
                    ", ".join(seen[:3] + (["..."] if len(seen) > 6 else []) + seen[3:][-3:])
                )
                return result
            frame = json.loads(text)
            kind = frame.get("type", "")
            seen.append(f"{kind}#{frame.get('seq')}")
            result.run = result.run or frame.get("run")
            if kind == "token" and result.ttft is None:
                result.ttft = time.perf_counter() - started
            elif kind == "error":
                result.error = f"error frame {frame.get('code')}: {frame.get('message')}"
                return result
            elif kind in FINAL_EVENTS:
                result.latency = time.perf_counter() - started
                result.ok = kind == "run.completed"
                if not result.ok:
                    result.error = f"{kind}: {frame.get('code')} {frame.get('message')}"
                return result

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()


class FastAPIClient:
    """A streaming HTTP client on a thread of its own (its own keep-alive connection)."""

    def __init__(self, port: int, thread: str) -> None:
        self.url = f"http://127.0.0.1:{port}/chat/{thread}"
        self.client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        self.client = httpx.AsyncClient(timeout=TURN_TIMEOUT, trust_env=False)

    async def turn(self) -> TurnResult:
        assert self.client is not None
        started = time.perf_counter()
        result = TurnResult(ok=False, started=started)
        async with self.client.stream("POST", self.url, json={"content": PROMPT}) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                kind = json.loads(line[6:])["type"]
                if kind == "token" and result.ttft is None:
                    result.ttft = time.perf_counter() - started
                elif kind == "done":
                    result.latency = time.perf_counter() - started
                    result.ok = True
        if not result.ok:
            result.error = "stream ended without done"
        return result

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


Client = AgentsiteClient | FastAPIClient


class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int

    def clients(self, count: int) -> list[Client]:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        return self.process.pid


class AgentsiteServer(Server):
    name = "agentsite"

    def __init__(self, backend: Backend, workdir: Path, users: int, per_user: int) -> None:
        self.backend = backend
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "agentsite.log"
        self.users = users
        self.per_user = per_user
        self.opened = 0
        self.logins: list[tuple[urllib.request.OpenerDirector, http.cookiejar.CookieJar]] = []

    def start(self, *, prepare: bool) -> None:
        if prepare:
            script = PREPARE_SCRIPT.format(
                users=self.users, password=PASSWORD, per_user=self.per_user
            )
            done = subprocess.run(
                [sys.executable, "manage.py", "shell", "--no-imports", "-c", script],
                cwd=ROOT,
                env=self.backend.env,
                capture_output=True,
                timeout=600,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"Preparing the database failed:\n{done.stderr.decode()[-3000:]}"
                )
        command = agentsite_command(self.port)
        self.process = spawn(pinned(command, SERVER_CORE), self.backend.env, self.log)
        wait_until_up(self.url + "/login/", self.process, self.log)
        self.logins = [self._log_in(f"bench{index}") for index in range(self.users)]

    def _log_in(
        self, username: str
    ) -> tuple[urllib.request.OpenerDirector, http.cookiejar.CookieJar]:
        """Through the login form, as a browser: its CSRF token, then the POST."""
        cookies = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(cookies))
        with opener.open(self.url + "/login/", timeout=120) as response:
            token = re.search(
                r'name="csrfmiddlewaretoken" value="([^"]+)"', response.read().decode()
            )
        assert token is not None, "no CSRF token on the login page"
        fields = {"username": username, "password": PASSWORD, "csrfmiddlewaretoken": token[1]}
        request = urllib.request.Request(
            self.url + "/login/",
            data=urllib.parse.urlencode(fields).encode(),
            headers={"Referer": self.url + "/login/"},
        )
        with opener.open(request, timeout=120) as response:
            if not re.search(r"/c/[0-9a-f-]{36}/", response.url):
                raise RuntimeError(f"login as {username} failed: landed on {response.url}")
        return opener, cookies

    def _new_conversation(self, index: int) -> tuple[str, str]:
        """A new conversation (the "New chat" button) for login `index`."""
        opener, cookies = self.logins[index]
        csrf = next(c.value for c in cookies if c.name == "csrftoken")
        request = urllib.request.Request(
            self.url + "/c/new/",
            data=urllib.parse.urlencode({"csrfmiddlewaretoken": csrf}).encode(),
            headers={"Referer": self.url + "/"},
        )
        with opener.open(request, timeout=120) as response:
            found = re.search(r"/c/([0-9a-f-]{36})/", response.url)
        assert found is not None, response.url
        cookie = "; ".join(f"{c.name}={c.value}" for c in cookies)
        return cookie, found[1]

    def clients(self, count: int) -> list[Client]:
        made: list[Client] = []
        for _ in range(count):
            cookie, conversation = self._new_conversation(self.opened % self.users)
            self.opened += 1
            made.append(AgentsiteClient(self.port, cookie, conversation))
        return made


class FastAPIServer(Server):
    name = "fastapi"

    def __init__(self, backend: Backend, workdir: Path) -> None:
        self.env = backend.env
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "fastapi.log"

    def start(self) -> None:
        command = fastapi_command(self.port)
        self.process = spawn(pinned(command, SERVER_CORE), self.env, self.log)
        wait_until_up(self.url + "/healthz", self.process, self.log)

    def clients(self, count: int) -> list[Client]:
        import uuid

        return [FastAPIClient(self.port, str(uuid.uuid4())) for _ in range(count)]


# --- other processes a turn costs (PostgreSQL backends, redis-server) ----------------------


class DatabaseCPU:
    """CPU of the PostgreSQL backends serving one database on the shared server.

    A backend's CPU is only readable while it lives, so a sampler thread reads
    pg_stat_activity and /proc every `interval` s and keeps each backend's last reading;
    a backend born in the window counts from 0. What a backend spends after its last
    sample and before it exits is missed: `sessions` (from pg_stat_database) says how
    many backends the window opened, so a reader sees how much of that there could be.
    The postmaster's reaped-children CPU (cutime+cstime) is also kept: it includes every
    backend that exited in the window, of every database on the shared server (others'
    tests too), so it is an upper bound, not a measure."""

    def __init__(self, database: str, interval: float = 0.02) -> None:
        self.database = database
        self.interval = interval
        self.admin = psycopg.connect(
            "postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True
        )
        self.postmaster = int(
            self.admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
            ).fetchone()[0]  # type: ignore[index]
        )
        self.postmaster = int(_stat_fields(self.postmaster)[1])  # the checkpointer's parent
        self.readings: dict[int, tuple[float, float]] = {}  # pid -> (first, last)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def _sample(self, *, first: bool) -> None:
        rows = self.admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.database,)
        ).fetchall()
        for (pid,) in rows:
            used = process_cpu(pid)
            if pid in self.readings:
                start, _ = self.readings[pid]
                self.readings[pid] = (start, max(used, self.readings[pid][1]))
            else:
                self.readings[pid] = (used if first else 0.0, used)

    def _sessions(self) -> int:
        row = self.admin.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = %s", (self.database,)
        ).fetchone()
        return int(row[0]) if row else 0

    def _reaped(self) -> float:
        fields = _stat_fields(self.postmaster)
        return (int(fields[13]) + int(fields[14])) / TICK

    def start(self) -> None:
        self.readings = {}
        self.sessions_before = self._sessions()
        self.reaped_before = self._reaped()
        self._sample(first=True)
        self.stopping.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            with contextlib.suppress(Exception):
                self._sample(first=False)

    def finish(self) -> dict[str, float]:
        self.stopping.set()
        assert self.thread is not None
        self.thread.join()
        self._sample(first=False)
        return {
            "db_cpu": sum(last - first for first, last in self.readings.values()),
            "db_sessions": self._sessions() - self.sessions_before,
            "db_backends_seen": len(self.readings),
            "postmaster_reaped_cpu": self._reaped() - self.reaped_before,
        }

    def close(self) -> None:
        self.admin.close()


# --- the load ------------------------------------------------------------------------------


@dataclass
class Window:
    results: list[TurnResult] = field(default_factory=list)
    wall: float = 0.0
    server_cpu: float = 0.0
    loadgen_cpu: float = 0.0
    core_busy: float = 0.0  # the server's core, all processes: the server's and others'
    span: float = 0.0  # the wall time the CPU readings cover (the turns, then the settle)
    extra: dict[str, float] = field(default_factory=dict)
    open_errors: list[str] = field(default_factory=list)


async def _gather_limited(jobs: list[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            try:
                return await job()
            except Exception as error:
                return error

    return await asyncio.gather(*(one(job) for job in jobs))


async def _safe_turn(client: Client) -> TurnResult:
    started = time.perf_counter()
    try:
        return await client.turn()
    except Exception as error:  # a dropped socket, a timeout: counted, not fatal
        return TurnResult(ok=False, started=started, error=f"{type(error).__name__}: {error}")


async def measured_window(
    server: Server, clients: list[Client], *, turns: int, backend: Backend, settle: float = 0.3
) -> Window:
    """`turns` turns in a closed loop (each client sends its next turn when its last one
    ended), with the CPU the server (and for Agentsite its database and Redis) spent."""
    window = Window()
    is_agentsite = isinstance(server, AgentsiteServer)
    database = DatabaseCPU(backend.database) if backend.database and is_agentsite else None
    redis = backend.redis.process if backend.redis and is_agentsite else None
    remaining = turns

    async def loop(client: Client) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            window.results.append(await _safe_turn(client))

    if database:
        database.start()
    redis_before = process_cpu(redis.pid) if redis else 0.0
    cpu_before = tree_cpu(server.pid)
    core_before = core_busy(SERVER_CORE)
    own_before = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in clients))
    window.wall = time.perf_counter() - started
    # Work a turn leaves behind after its last frame (if any) lands in the window too.
    await asyncio.sleep(settle)
    window.server_cpu = tree_cpu(server.pid) - cpu_before
    window.core_busy = core_busy(SERVER_CORE) - core_before
    window.span = time.perf_counter() - started
    window.loadgen_cpu = time.process_time() - own_before
    for result in window.results:
        if not result.ok and result.run:
            result.error = f"{result.error} [{backend.run_row(result.run)}]"
    if redis:
        window.extra["redis_cpu"] = process_cpu(redis.pid) - redis_before
    if database:
        window.extra.update(database.finish())
        database.close()
    return window


def merged(windows: list[Window]) -> Window:
    total = Window()
    for window in windows:
        total.results += window.results
        total.wall += window.wall
        total.server_cpu += window.server_cpu
        total.loadgen_cpu += window.loadgen_cpu
        total.core_busy += window.core_busy
        total.span += window.span
        total.open_errors += window.open_errors
        for key, value in window.extra.items():
            total.extra[key] = total.extra.get(key, 0) + value
    return total


async def _warm(client: Client, turns: int) -> None:
    for _ in range(turns):
        result = await _safe_turn(client)
        if not result.ok:
            raise RuntimeError(f"warm-up turn failed: {result.error}")


async def open_clients(clients: list[Client], limit: int = 20) -> list[str]:
    outcomes = await _gather_limited([c.open for c in clients], limit)
    return [f"{type(e).__name__}: {e}" for e in outcomes if isinstance(e, Exception)]


async def close_clients(clients: list[Client]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@contextlib.contextmanager
def sampled(pid: int, output: Path | None) -> Iterator[None]:
    """py-spy samples process `pid` into `output`, in its raw (collapsed stacks) format;
    nothing without an `output`. Only the thread holding the GIL is sampled (`--gil`), so
    the samples follow the Python CPU: without it py-spy also counts threads waiting in
    a queue or on the disk as busy. Non-blocking: it never pauses the server."""
    if output is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--gil",
        "--nonblocking",
        "--rate",
        "250",
    ]
    recorder = subprocess.Popen(
        pinned([*command, "--output", str(output)], LOADGEN_CORE),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _children.append(recorder)  # type: ignore[arg-type]
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        _, err = recorder.communicate(timeout=60)
        _children.remove(recorder)  # type: ignore[arg-type]
        if recorder.returncode not in (0, -signal.SIGINT) or not output.exists():
            print(f"  py-spy failed ({recorder.returncode}): {err.decode()[-500:]}")
        else:
            print(f"  profile of the Agentsite server's measured windows: {output}")


# --- both servers, interleaved ------------------------------------------------------------


@dataclass
class Measured:
    window: Window
    idle_rss: float | None = None
    rss_per_conversation: float | None = None


async def measure_memory(server: Server, count: int, concurrency: int) -> tuple[float, float]:
    """Idle RSS after one finished turn; then RSS per open conversation: `count` more
    clients, each connected with one finished turn, kept open while RSS is read."""
    first = await asyncio.to_thread(server.clients, 1)
    await open_clients(first)
    await _warm(first[0], 1)
    await asyncio.sleep(0.5)
    idle = tree_rss_mib(server.pid)
    many = await asyncio.to_thread(server.clients, count)
    errors = await open_clients(many)
    if errors:
        raise RuntimeError(f"{len(errors)} clients could not connect: {errors[0]}")
    failed = await _gather_limited([partial(_warm, c, 1) for c in many], limit=concurrency)
    failed = [e for e in failed if isinstance(e, Exception)]
    if failed:
        raise RuntimeError(f"{len(failed)} first turns failed: {failed[0]}")
    await asyncio.sleep(0.5)
    per = (tree_rss_mib(server.pid) - idle) / count
    await close_clients([*first, *many])
    return idle, per


async def measure_pair(
    servers: list[Server], backend: Backend, args: argparse.Namespace, concurrency: int, turns: int
) -> list[Measured]:
    """Both servers are up (pinned to the same core); they take turns at the load in
    `args.rounds` rounds, so whatever else the machine is doing meanwhile falls on both."""
    measured = [Measured(Window()) for _ in servers]
    if args.memory_conversations:
        for server, result in zip(servers, measured, strict=True):
            result.idle_rss, result.rss_per_conversation = await measure_memory(
                server, args.memory_conversations, concurrency
            )
    sets = [await asyncio.to_thread(server.clients, concurrency) for server in servers]
    try:
        windows: list[list[Window]] = [[] for _ in servers]
        usable = []
        for clients, result in zip(sets, measured, strict=True):
            errors = await open_clients(clients)
            result.window.open_errors = errors
            usable.append(not errors)
        for clients, result in zip(sets, measured, strict=True):
            if not result.window.open_errors and args.warmup:
                warmed = await _gather_limited(
                    [partial(_warm, c, args.warmup) for c in clients], limit=len(clients)
                )
                # Counted with the errors; the measured turns still run.
                result.window.open_errors += [str(e) for e in warmed if isinstance(e, Exception)]
        per_round = [turns // args.rounds + (r < turns % args.rounds) for r in range(args.rounds)]
        profile = (
            Path(args.profile) / f"{backend.name}-c{concurrency}.txt" if args.profile else None
        )
        with sampled(servers[0].pid, profile):
            for count in per_round:
                for index, server in enumerate(servers):
                    if usable[index]:
                        windows[index].append(
                            await measured_window(server, sets[index], turns=count, backend=backend)
                        )
        for index, result in enumerate(measured):
            errors = result.window.open_errors
            result.window = merged(windows[index])
            result.window.open_errors = errors
    finally:
        for clients in sets:
            await close_clients(clients)
    return measured


# --- configurations -----------------------------------------------------------------------


@contextlib.contextmanager
def backend_for(config: str, workdir: Path, delay: float) -> Iterator[Backend]:
    env = _server_env(workdir)
    env.update(
        DEBUG="false",
        SECRET_KEY="turn-cost-" + secrets.token_urlsafe(48),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        LOG_LEVEL="WARNING",
        # Plain HTTP on loopback (TLS ends at the proxy in production): the browser's
        # cookie jar only sends cookies that are not marked Secure.
        SESSION_COOKIE_SECURE="false",
        CSRF_COOKIE_SECURE="false",
        AGENT_OFFLINE_TOKEN_DELAY=str(delay),
        # The check still runs (and counts) every turn; only its ceiling is out of reach.
        AGENT_RATE_LIMIT_PER_MINUTE="10000000",
    )
    if config == "sqlite":
        yield Backend("sqlite", env)
        return
    redis = RedisServer(workdir)
    redis.start()
    _children.append(redis.process)  # type: ignore[arg-type]
    try:
        with postgres_database("bench_turn") as url:
            env.update(DATABASE_URL=url, AGENT_REDIS_URL=redis.url)
            yield Backend("postgres", env, database=url.rsplit("/", 1)[1], redis=redis)
    finally:
        redis.kill()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def stats(measured: Measured) -> dict[str, Any]:
    window = measured.window
    ok = [r for r in window.results if r.ok]
    count = len(window.results)
    latencies = [r.latency for r in ok if r.latency is not None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    errors = [r.error for r in window.results if not r.ok]
    out: dict[str, Any] = {
        "turns": count,
        "errors": len(errors) + len(window.open_errors),
        "error_kinds": sorted({(e or "")[:200] for e in [*errors, *window.open_errors]}),
        "cpu_ms": window.server_cpu * 1000 / count if count else None,
        "turns_per_s": len(ok) / window.wall if window.wall else None,
        "lat_p50": percentile(latencies, 0.5),
        "lat_p99": percentile(latencies, 0.99),
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p99": percentile(ttfts, 0.99),
        "loadgen_cpu_pct": 100 * window.loadgen_cpu / window.span if window.span else None,
        # Whatever else ran on the server's core meanwhile (other people's processes):
        # the noise in this run's latencies and throughput.
        "core_others_pct": (
            100 * max(window.core_busy - window.server_cpu, 0) / window.span
            if window.span
            else None
        ),
        "idle_rss": measured.idle_rss,
        "rss_per_conversation": measured.rss_per_conversation,
    }
    for key, value in window.extra.items():
        out[key] = value * 1000 / count if count and key.endswith("cpu") else value
    return out


def fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    return "-" if value is None else pattern.format(value)


def print_table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    print(f"\n{title}")
    width = max(len(r[0]) for r in rows)
    print(f"  {'':{width}}  {'agentsite':>16}  {'fastapi':>16}  {'ratio A/F':>10}")
    for label, a, f, ratio in rows:
        print(f"  {label:{width}}  {a:>16}  {f:>16}  {ratio:>10}")


def ratio(a: float | None, f: float | None) -> str:
    if a is None or f is None or f == 0:
        return "-"
    return f"{a / f:.1f}x"


def report(
    config: str,
    concurrency: int,
    a: dict[str, Any],
    f: dict[str, Any],
    ideal: Ideal | None,
    args: argparse.Namespace,
) -> None:
    ms = 1000.0

    def pair(key: str, scale: float = ms, minus: float = 0.0) -> tuple[str, str]:
        return tuple(  # type: ignore[return-value]
            fmt(None if s[key] is None else (s[key] - minus) * scale) for s in (a, f)
        )

    def p50_99(low: str, high: str, minus: float = 0.0) -> tuple[str, str]:
        pattern = "{:+.0f}" if minus else "{:.1f}"

        def one(value: float | None) -> str:
            return fmt(None if value is None else (value - minus) * ms, pattern)

        return tuple(f"{one(s[low])} / {one(s[high])}" for s in (a, f))  # type: ignore[return-value]

    mode = f"paced {ideal.delay * 1000:.0f} ms/token" if ideal else "unpaced"
    title = (
        f"== {config}, {mode}, concurrency {concurrency}: {a['turns']} / {f['turns']} "
        f"measured turns ({args.rounds} alternating rounds) after {args.warmup} warm-up "
        "turn(s) per client =="
    )
    rows: list[tuple[str, str, str, str]] = [
        ("server CPU ms/turn", *pair("cpu_ms", 1.0), ratio(a["cpu_ms"], f["cpu_ms"])),
        ("turns/s", *pair("turns_per_s", 1.0), ratio(a["turns_per_s"], f["turns_per_s"])),
    ]
    if ideal:
        rows += [
            ("TTFT over ideal p50/p99 ms", *p50_99("ttft_p50", "ttft_p99", ideal.ttft), ""),
            ("turn over ideal p50/p99 ms", *p50_99("lat_p50", "lat_p99", ideal.turn), ""),
        ]
    rows += [
        ("TTFT p50/p99 ms", *p50_99("ttft_p50", "ttft_p99"), ratio(a["ttft_p50"], f["ttft_p50"])),
        ("turn p50/p99 ms", *p50_99("lat_p50", "lat_p99"), ratio(a["lat_p50"], f["lat_p50"])),
        ("errors", str(a["errors"]), str(f["errors"]), ""),
    ]
    if "db_cpu" in a:
        rows += [
            ("PostgreSQL backends CPU ms/turn", fmt(a["db_cpu"]), "-", ""),
            (
                "  new PG sessions/turn",
                fmt(a["db_sessions"] / max(a["turns"], 1), "{:.2f}"),
                "-",
                "",
            ),
            ("  postmaster reaped CPU ms/turn*", fmt(a["postmaster_reaped_cpu"]), "-", ""),
            ("Redis CPU ms/turn", fmt(a["redis_cpu"]), "-", ""),
            (
                "server+PG+Redis CPU ms/turn",
                fmt(a["cpu_ms"] + a["db_cpu"] + a["redis_cpu"]),
                fmt(f["cpu_ms"]),
                ratio(a["cpu_ms"] + a["db_cpu"] + a["redis_cpu"], f["cpu_ms"]),
            ),
        ]
    if a["idle_rss"] is not None:
        rows += [
            ("idle RSS MiB", *pair("idle_rss", 1.0), ratio(a["idle_rss"], f["idle_rss"])),
            (
                f"RSS MiB per open conversation (n={args.memory_conversations})",
                fmt(a["rss_per_conversation"], "{:.3f}"),
                fmt(f["rss_per_conversation"], "{:.3f}"),
                "",
            ),
        ]
    rows.append(("load generator CPU % of its core", *pair("loadgen_cpu_pct", 1.0), ""))
    rows.append(
        (f"others' CPU % on the server's core {SERVER_CORE}", *pair("core_others_pct", 1.0), "")
    )
    print_table(title, rows)
    if ideal:
        print(f"  {ideal.explain()}")
    if "db_cpu" in a:
        print(
            "  PostgreSQL CPU counts the backends of this run's database, sampled every 20 ms"
            " from pg_stat_activity + /proc (a backend's CPU after its last sample is missed);"
            "\n  * the postmaster's reaped-children CPU covers every backend that exited in the"
            " window, of ALL databases on the shared server: an upper bound only."
        )
    for name, s in (("agentsite", a), ("fastapi", f)):
        for kind in s["error_kinds"][:5]:
            print(f"  {name} error: {kind}")
    sys.stdout.flush()


async def run_config(
    config: str, args: argparse.Namespace, delay: float, concurrencies: list[int]
) -> None:
    largest = max(concurrencies)
    users = min(largest, args.users)
    per_user = math.ceil(largest / users)
    with tempfile.TemporaryDirectory(prefix="turn-cost-") as tmp:
        workdir = Path(tmp)
        try:
            with backend_for(config, workdir, delay) as backend:
                ideal = ideal_for(backend.env, delay) if delay else None
                for concurrency in concurrencies:
                    turns = args.turns if not delay else concurrency * args.turns_per_client
                    agentsite = AgentsiteServer(backend, workdir, users, per_user)
                    fastapi = FastAPIServer(backend, workdir)
                    try:
                        agentsite.start(prepare=concurrency == concurrencies[0])
                        fastapi.start()
                        a, f = (
                            stats(m)
                            for m in await measure_pair(
                                [agentsite, fastapi], backend, args, concurrency, turns
                            )
                        )
                    finally:
                        for server in (agentsite, fastapi):
                            if hasattr(server, "process"):
                                stop(server.process)
                    report(config, concurrency, a, f, ideal, args)
                    if args.json:
                        record = {"config": config, "concurrency": concurrency, "delay": delay}
                        append_json(args.json, {**record, "agentsite": a, "fastapi": f})
        finally:
            if args.keep_logs:
                keep_logs(workdir, Path(args.keep_logs), config)


def append_json(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")


def keep_logs(workdir: Path, into: Path, config: str) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("*.log"):
        shutil.copy(log, into / f"{config}-{log.name}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument(
        "--paced",
        action="store_true",
        help="AGENT_OFFLINE_TOKEN_DELAY=0.05, latencies over the ideal",
    )
    parser.add_argument("--delay", type=float, default=0.05, help="token delay when --paced (s)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", help="clients (default 8; paced: 100 300)"
    )
    parser.add_argument(
        "--turns", type=int, default=300, help="measured turns per server (unpaced)"
    )
    parser.add_argument(
        "--turns-per-client",
        type=int,
        default=2,
        help="paced: measured turns per client, one per round (all clients start together)",
    )
    parser.add_argument(
        "--warmup", type=int, help="warm-up turns per client, not measured (2; paced: 1)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measured windows per server, alternating between the two servers",
    )
    parser.add_argument("--users", type=int, default=10, help="logged-in users the clients share")
    parser.add_argument(
        "--memory-conversations",
        type=int,
        default=None,
        help="open conversations for RSS per conversation (default 100 unpaced, 0 = skip)",
    )
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    parser.add_argument(
        "--profile",
        help="sample the Agentsite server with py-spy during the measured windows, into "
        "DIR/<config>-c<concurrency>.txt (collapsed stacks; needs `pip install py-spy`)",
        metavar="DIR",
    )
    parser.add_argument("--keep-logs", help="copy the servers' logs into this directory")
    args = parser.parse_args()
    if args.paced:
        args.rounds = args.turns_per_client
    if args.warmup is None:
        args.warmup = 1 if args.paced else 2
    if args.memory_conversations is None:
        args.memory_conversations = 0 if args.paced else 100
    concurrencies = args.concurrency or ([100, 300] if args.paced else [8])
    delay = args.delay if args.paced else 0.0
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {LOADGEN_CORE})

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    print(
        f"turn_cost: serving {ROOT} (server on core {SERVER_CORE}, load generator on core "
        f"{LOADGEN_CORE}); prompt {PROMPT!r}"
    )
    try:
        for config in args.config:
            asyncio.run(run_config(config, args, delay, concurrencies))
    finally:
        stop_all_children()


if __name__ == "__main__":
    main()
