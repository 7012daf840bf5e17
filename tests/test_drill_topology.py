"""Drills on the scaled-out topology (scripts/topology.sh): nginx in front of two web
instances, two workers executing the runs, PostgreSQL and a redis-server of the
drill's own. Processes are killed and restarted under clients that watch a run stream,
as a crash, a deploy or the OOM killer would; the clients must see one stream, the run
its answer, and the database everything. Run with -s to see the measured times."""

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from chat.agent.offline_model import INTRO
from chat.event_schemas import FINAL_EVENT_TYPES
from tests.drills import (
    Login,
    RedisServer,
    chat_socket,
    logins_read,
    needs_postgres_and_redis_server,
    prepare,
    receive,
    receive_until,
    resume_until_final,
)
from tests.servers import postgres_database
from tests.topology import Topology, nginx_available

pytestmark = [
    pytest.mark.skipif(
        not nginx_available(),
        reason="nginx is NOT installed (make nginx): the topology drills did NOT run",
    ),
    *needs_postgres_and_redis_server("the topology drills did NOT run"),
]

# About 70 tokens at 50 ms: a run streams for ~3.5 s, long enough to kill things under it.
LONG = "Tell me about yourself"
LONG_ANSWER = INTRO + "> " + LONG
SETTINGS = {
    "AGENT_OFFLINE_TOKEN_DELAY": "0.05",
    # The contract's shortest lease: a dead worker's run resumes within ~lease + lease/3.
    "AGENT_RUN_LEASE_SECONDS": "6",
    # A worker told to stop hands its runs back after 1 s instead of 20.
    "AGENT_WORKER_DRAIN_SECONDS": "1",
    "AGENT_RATE_LIMIT_PER_MINUTE": "0",
    "LOG_LEVEL": "INFO",
}
# One conversation per drill: the drills share the topology, never a conversation.
CONVERSATIONS = 6


class Drill:
    def __init__(self, topology: Topology, logins: list[Login]) -> None:
        self.topology = topology
        self.logins = logins

    def login(self) -> Login:
        return self.logins.pop()


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    workdir = tmp_path_factory.mktemp("topology")
    redis = RedisServer(workdir)
    with postgres_database("agentsite_topo") as database_url:
        redis.start()
        topology = Topology(workdir, database_url=database_url, redis_url=redis.url, **SETTINGS)
        topology.redis = redis  # type: ignore[attr-defined]
        try:
            took = topology.up()
            print(f"\ntopology up in {took:.1f} s (fresh database, migrated)")
            logins = logins_read(prepare(topology.app_env(), conversations=CONVERSATIONS))
            yield Drill(topology, logins)
        finally:
            stopping = time.monotonic()
            stopped = topology.down()
            print(f"\ntopology down in {time.monotonic() - stopping:.1f} s")
            redis.kill()
            assert stopped.returncode == 0, stopped.stderr


@pytest.fixture
def topology(drill: Drill) -> Topology:
    """The whole topology, running: what an earlier drill killed is started again."""
    drill.topology.up()
    return drill.topology


async def start_run(socket: ClientConnection, content: str) -> list[dict[str, Any]]:
    assert (await receive(socket))["type"] == "session"
    await socket.send(json.dumps({"type": "message", "content": content}))
    return await receive_until(socket, "run.started")


async def read_tokens(socket: ClientConnection, frames: list[dict[str, Any]], count: int) -> None:
    while sum(frame["type"] == "token" for frame in frames) < count:
        frames.append(await receive(socket))


async def receive_until_final(
    socket: ClientConnection, *also: str, wait: float = 60
) -> list[dict[str, Any]]:
    """Every frame up to the run's final event, or the first of the types `also`."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait
    while not frames or frames[-1]["type"] not in {*FINAL_EVENT_TYPES, *also}:
        frames.append(await receive(socket, max(deadline - time.monotonic(), 0.01)))
    return frames


def one_stream(frames: list[dict[str, Any]], run: str) -> list[dict[str, Any]]:
    """The run's frames a client drew, checked to be one stream: each event once, in
    order, ending with exactly one final event."""
    mine = [frame for frame in frames if frame.get("run") == run]
    seqs = [frame["seq"] for frame in mine]
    assert seqs == sorted(set(seqs)), f"events repeated or out of order: {seqs}"
    assert [f["type"] in FINAL_EVENT_TYPES for f in mine].count(True) == 1
    assert mine[-1]["type"] in FINAL_EVENT_TYPES
    return mine


def shown_answer(frames: list[dict[str, Any]]) -> str:
    """The answer as the page shows it: the tokens streamed since the run last resumed
    (a resumed run drops the output of the step that was cut)."""
    since = max((i for i, f in enumerate(frames) if f["type"] == "run.resumed"), default=-1)
    return "".join(f["text"] for f in frames[since + 1 :] if f["type"] == "token")


def run_row(topology: Topology, run: str, *columns: str) -> tuple[Any, ...]:
    [row] = topology.query(f"SELECT {', '.join(columns)} FROM chat_run WHERE id = %s", run)
    return row


def executing_process(topology: Topology, run: str) -> str:
    """The name of the process holding the run's lease (`host:pid:…`)."""
    deadline = time.monotonic() + 30
    while True:
        [(owner,)] = topology.query("SELECT lease_owner FROM chat_run WHERE id = %s", run)
        if owner:
            pid = int(owner.split(":")[1])
            names = topology.names("web") + topology.names("worker")
            [name] = [name for name in names if topology.pid(name) == pid]
            return name
        assert time.monotonic() < deadline, "no process took the run's lease"
        time.sleep(0.05)


def assert_billed_once(topology: Topology, run: str) -> None:
    """Every model call of the run is in the ledger once, nothing is still held, and the
    run's cost is what its ledger rows add up to."""
    rows = topology.query(
        "SELECT span_id, cost_usd FROM billing_usagerecord WHERE run_id = %s", run
    )
    spans = [span for span, _ in rows]
    assert rows and len(spans) == len(set(spans)), rows
    held = topology.query("SELECT count(*) FROM billing_budgetreservation WHERE run_id = %s", run)
    assert held == [(0,)]
    assert run_row(topology, run, "cost_usd") == (sum((cost for _, cost in rows), Decimal(0)),)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def messages_seen_by(topology: Topology, url: str, login: Login) -> list[tuple[str, str]]:
    """The conversation as the JSON API at `url` lists it to the signed-in browser."""
    request = urllib.request.Request(
        f"{url}/api/v1/conversations/{login.conversation}/messages?limit=100",
        headers={"Cookie": f"sessionid={login.session}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        items = json.loads(response.read())["items"]
    return [(item["role"], item["content"]) for item in items]


async def test_a_conversation_started_on_one_instance_continues_on_the_other(
    topology: Topology, drill: Drill
) -> None:
    login = drill.login()
    web_a, web_b = topology.web_urls
    async with chat_socket(web_a, login) as socket:
        await start_run(socket, "What is 17 * 23?")
        first = await receive_until(socket, "run.completed")
    async with chat_socket(web_b, login) as socket:
        await start_run(socket, "What is 6 * 7?")
        second = await receive_until(socket, "run.completed")

    # Both answers, each from its own turn.
    assert "**391**" in first[-1]["messages"][-1]["content"]
    assert "**42**" in second[-1]["messages"][-1]["content"]
    # The model on B was given the first turn too: the offline model names its tool
    # call after the number of messages it was sent (question, call, result, answer).
    [call_a] = [f["tool_call_id"] for f in first if f["type"] == "tool.started"]
    [call_b] = [f["tool_call_id"] for f in second if f["type"] == "tool.started"]
    assert int(call_b.rsplit("_", 1)[1]) == int(call_a.rsplit("_", 1)[1]) + 4
    # Either instance, and nginx, list the whole conversation alike.
    listed = messages_seen_by(topology, web_b, login)
    assert [role for role, _ in listed if role != "tool"] == ["user", "assistant"] * 2
    assert listed == messages_seen_by(topology, web_a, login)
    assert listed == messages_seen_by(topology, topology.url, login)


async def test_a_client_on_one_instance_follows_a_run_on_a_worker_token_by_token(
    topology: Topology, drill: Drill
) -> None:
    login = drill.login()
    async with chat_socket(topology.web_urls[0], login) as socket:
        frames = await start_run(socket, LONG)
        run = frames[-1]["run"]
        await read_tokens(socket, frames, 1)
        # The first token is on the screen while the run is still going, on a worker.
        assert run_row(topology, run, "status") == ("running",)
        assert executing_process(topology, run).startswith("worker")
        frames += await receive_until(socket, "run.completed")

    mine = one_stream(frames, run)
    assert sum(frame["type"] == "token" for frame in mine) > 20
    assert shown_answer(mine) == LONG_ANSWER == mine[-1]["messages"][-1]["content"]
    assert_billed_once(topology, run)


async def test_a_run_whose_worker_was_killed_resumes_on_the_other_worker(
    topology: Topology, drill: Drill
) -> None:
    login = drill.login()
    async with chat_socket(topology.url, login) as socket:
        frames = await start_run(socket, LONG)
        run = frames[-1]["run"]
        await read_tokens(socket, frames, 5)
        worker = executing_process(topology, run)
        topology.signal(worker, signal.SIGKILL)
        killed = time.monotonic()
        frames += await receive_until_final(socket, "run.resumed")
        recovered_after = time.monotonic() - killed
        assert frames[-1]["type"] == "run.resumed", frames[-1]
        frames += await receive_until_final(socket)

    print(f"\nworker killed mid-run: the run resumed on another after {recovered_after:.2f} s")
    mine = one_stream(frames, run)
    # Not restarted: the tokens before the kill were the same answer's, and the
    # answer shown after the resume is the whole of it.
    assert shown_answer(mine) == LONG_ANSWER == mine[-1]["messages"][-1]["content"]
    assert run_row(topology, run, "status", "recoveries") == ("completed", 1)
    assert executing_process(topology, run) != worker
    assert_billed_once(topology, run)


async def test_a_killed_web_instance_is_routed_around_and_its_clients_resume(
    topology: Topology, drill: Drill
) -> None:
    login = drill.login()
    async with chat_socket(topology.url, login) as socket:
        frames = await start_run(socket, LONG)
        run = frames[-1]["run"]
        await read_tokens(socket, frames, 3)
        # The instance nginx gave this socket to.
        [serving] = [
            name
            for name in topology.names("web")
            if f"/ws/chat/{login.conversation}/" in topology.log(name)
        ]
        topology.signal(serving, signal.SIGKILL)
        try:
            while True:
                frames.append(await receive(socket, wait=10))
        except ConnectionClosed:
            pass

    # New requests reach the instance left, every one.
    statuses = [await asyncio.to_thread(http_status, topology.url + "/readyz") for _ in range(6)]
    assert statuses == [200] * 6
    after_seq = max(frame["seq"] for frame in frames if frame.get("run") == run)
    frames += await resume_until_final(topology.url, login, run, after_seq=after_seq)

    mine = one_stream(frames, run)
    assert mine[-1]["type"] == "run.completed"
    assert shown_answer(mine) == LONG_ANSWER
    # The run never noticed: it was on a worker.
    assert executing_process(topology, run).startswith("worker")


async def test_a_worker_told_to_stop_hands_its_run_back_and_it_completes_elsewhere(
    topology: Topology, drill: Drill
) -> None:
    login = drill.login()
    async with chat_socket(topology.url, login) as socket:
        frames = await start_run(socket, LONG)
        run = frames[-1]["run"]
        await read_tokens(socket, frames, 3)
        worker = executing_process(topology, run)
        topology.signal(worker, signal.SIGTERM)
        frames += await receive_until_final(socket)
        # It drained and exited (its 1 s drain is shorter than the run).
        await asyncio.to_thread(topology.wait_gone, worker)

    mine = one_stream(frames, run)
    assert mine[-1]["type"] == "run.completed", mine[-1]
    assert shown_answer(mine) == LONG_ANSWER
    assert run_row(topology, run, "status", "recoveries") == ("completed", 1)
    assert executing_process(topology, run) != worker
    assert_billed_once(topology, run)


async def test_clients_learn_the_outcome_of_a_run_across_a_redis_restart(
    topology: Topology, drill: Drill
) -> None:
    login = drill.login()
    redis: RedisServer = topology.redis  # type: ignore[attr-defined]
    runs_before = topology.query("SELECT id, status FROM chat_run ORDER BY id")
    async with chat_socket(topology.url, login) as socket:
        frames = await start_run(socket, LONG)
        run = frames[-1]["run"]
        await read_tokens(socket, frames, 5)
        redis.kill()
        redis.start()
        # Whatever the socket still delivers, until it closes or goes quiet.
        try:
            while frames[-1]["type"] not in FINAL_EVENT_TYPES:
                frames.append(await receive(socket, wait=5))
        except (ConnectionClosed, TimeoutError):
            pass
    if frames[-1]["type"] not in FINAL_EVENT_TYPES:
        after_seq = max(frame["seq"] for frame in frames if frame.get("run") == run)
        frames += await resume_until_final(topology.url, login, run, after_seq=after_seq)

    final = frames[-1]
    assert final["run"] == run and final["type"] == "run.completed", final
    assert final["messages"][-1]["content"] == LONG_ANSWER
    # Nothing in PostgreSQL was lost: every earlier run as it was, this one stored.
    assert set(runs_before) <= set(topology.query("SELECT id, status FROM chat_run"))
    assert run_row(topology, run, "status") == ("completed",)
    assert ("assistant", LONG_ANSWER) in messages_seen_by(topology, topology.url, login)
