"""The scaled-out topology under load (issue 11): nginx -> 2 Daphne web instances -> 2
Procrastinate workers, on PostgreSQL and Redis, next to the bare FastAPI pattern.

    .venv/bin/python benchmarks/topology_cost.py                     # C=200, paced 50 ms
    .venv/bin/python benchmarks/topology_cost.py --concurrency 100 200 --turns-per-client 2

Run from the root of a checkout. It starts the topology with the repository's own
`scripts/topology.sh up` (a throwaway database on the shared PostgreSQL, a redis-server of
this run's own on a free port, state in a temporary directory), signs `--users` users in
through nginx (the login form), gives every client a conversation of its own, and sends
each client's turns over a WebSocket through nginx: a web instance accepts the message,
a worker executes the run, and the web instance follows the run's events from Redis to
the socket. The bare pattern (benchmarks/fastapi_baseline.py: FastAPI + SSE under
uvicorn, the same graph and offline model, an in-memory checkpointer, one process) takes
the same load in alternating rounds, so the machine's other work falls on both.

The offline model waits AGENT_OFFLINE_TOKEN_DELAY (`--delay`, 0.05 s) before each chunk
after its first; every client sends one turn per round at the same moment; latencies
are shown over the ideal (what those waits alone take). Printed per system: time to first
token and turn latency over the ideal, errors, and CPU per turn split by process kind
(web instances, workers, nginx, PostgreSQL backends, Redis); for the topology also the
pickup latency: from the run's row being written (`Run.created_at`, inside the
transaction that also enqueues its job) to its execution starting (`Run.started_at`),
i.e. the queue, the worker's wait for a free slot and its first database hops. With
`--executor inline` the web instances execute the runs themselves (no workers): the
same measures for the monolith's executor behind the same nginx, for comparison.
Nothing is pinned to a core: with 2 web + 2 workers + nginx + PostgreSQL + Redis on a
two-core machine, the load generator shares the cores (its CPU share is printed).
"""

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from benchmarks.turn_cost import (  # noqa: E402
    PASSWORD,
    PREPARE_SCRIPT,
    AgentsiteServer,
    Backend,
    Client,
    DatabaseCPU,
    FastAPIClient,
    Ideal,
    TurnResult,
    _gather_limited,
    _safe_turn,
    _warm,
    close_clients,
    fastapi_command,
    fmt,
    ideal_for,
    keep_logs,
    open_clients,
    percentile,
    process_cpu,
    sampled,
    spawn,
    stop,
    stop_all_children,
    tree_cpu,
    wait_until_up,
)
from tests.conftest import _free_port, _server_env  # noqa: E402
from tests.drills import RedisServer  # noqa: E402
from tests.servers import postgres_database  # noqa: E402

TOPOLOGY = ROOT / "scripts" / "topology.sh"


class Topology:
    """`scripts/topology.sh` with its state in `workdir`; pids of each kind of process."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.dir = workdir / "topology"
        self.env = {**env, "TOPOLOGY_DIR": str(self.dir), "TOPOLOGY_PORT": str(_free_port())}
        self.port = int(self.env["TOPOLOGY_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"

    def script(self, command: str, timeout: float = 300) -> None:
        done = subprocess.run(
            ["bash", str(TOPOLOGY), command],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"topology.sh {command} failed:\n{done.stderr[-3000:]}")

    def pids(self, prefix: str) -> list[int]:
        return [
            int(path.read_text())
            for path in sorted((self.dir / "pids").glob(f"{prefix}*.pid"))
            if path.read_text().strip()
        ]


class ThroughNginx(AgentsiteServer):
    """Logins and conversations through nginx (the parent's form flow), no process."""

    def __init__(self, topology: Topology, users: int) -> None:
        self.port = topology.port
        self.url = topology.url
        self.users = users
        self.opened = 0
        self.logins = [self._log_in(f"bench{index}") for index in range(users)]


@dataclass
class Window:
    results: list[TurnResult] = field(default_factory=list)
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    loadgen_cpu: float = 0.0
    pickups: list[float] = field(default_factory=list)


@contextlib.contextmanager
def profiled(groups: dict[str, list[int]], into: str | None, concurrency: int) -> Iterator[None]:
    """py-spy samples the first web instance and the first worker (turn_cost's `sampled`)
    into DIR/c<concurrency>-<kind>.txt while the topology takes the load; nothing
    without `--profile`."""
    with contextlib.ExitStack() as stack:
        if into is not None:
            for kind in ("web", "worker")[: 1 + bool(groups["worker"])]:
                output = Path(into) / f"c{concurrency}-{kind}.txt"
                stack.enter_context(sampled(groups[kind][0], output))
        yield


def cpu_of(groups: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(tree_cpu(pid) for pid in pids) for name, pids in groups.items()}


async def window(
    clients: list[Client],
    groups: dict[str, list[int]],
    database: DatabaseCPU | None,
    database_url: str | None,
) -> Window:
    """One turn per client, all sent at once; the CPU each group of processes spent."""
    measured = Window()
    if database:
        database.start()
    before = cpu_of(groups)
    own = time.process_time()
    started_wall = time.time()
    started = time.perf_counter()
    measured.results = list(await asyncio.gather(*(_safe_turn(c) for c in clients)))
    measured.wall = time.perf_counter() - started
    await asyncio.sleep(0.3)  # work a turn leaves after its last frame lands here too
    after = cpu_of(groups)
    measured.cpu = {name: after[name] - before[name] for name in groups}
    measured.loadgen_cpu = time.process_time() - own
    if database:
        measured.cpu["postgres"] = database.finish()["db_cpu"]
    if database_url:
        measured.pickups = pickups_since(database_url, started_wall)
    return measured


def pickups_since(database_url: str, since: float) -> list[float]:
    query = (
        "SELECT extract(epoch FROM started_at - created_at) FROM chat_run "
        "WHERE created_at >= to_timestamp(%s) AND started_at IS NOT NULL"
    )
    with psycopg.connect(database_url) as db:
        return [float(row[0]) for row in db.execute(query, (since,)).fetchall()]


def summary(windows: list[Window], ideal: Ideal) -> dict[str, Any]:
    results = [r for w in windows for r in w.results]
    ok = [r for r in results if r.ok]
    turns = len(results) or 1
    cpu: dict[str, float] = {}
    for w in windows:
        for name, value in w.cpu.items():
            cpu[name] = cpu.get(name, 0.0) + value
    ttft = [r.ttft for r in ok if r.ttft is not None]
    latency = [r.latency for r in ok if r.latency is not None]
    pickups = [p for w in windows for p in w.pickups]
    span = sum(w.wall + 0.3 for w in windows)
    return {
        "turns": len(results),
        "errors": [r.error for r in results if not r.ok],
        "cpu_ms": {name: value * 1000 / turns for name, value in cpu.items()},
        "ttft": (percentile(ttft, 0.5), percentile(ttft, 0.99)),
        "turn": (percentile(latency, 0.5), percentile(latency, 0.99)),
        "ideal": ideal,
        "pickup": (percentile(pickups, 0.5), percentile(pickups, 0.99), len(pickups)),
        "loadgen_pct": 100 * sum(w.loadgen_cpu for w in windows) / span,
    }


def over(values: tuple[float | None, float | None], ideal: float) -> str:
    return " / ".join(fmt(None if v is None else (v - ideal) * 1000, "{:+.0f}") for v in values)


def report(concurrency: int, t: dict[str, Any], f: dict[str, Any], args: Any) -> None:
    ideal: Ideal = t["ideal"]
    print(
        f"\n== topology (nginx, {args.web} web, {args.workers} workers, {args.executor} "
        "executor) vs "
        f"fastapi (1 process), paced {ideal.delay * 1000:.0f} ms/token, concurrency "
        f"{concurrency}: {t['turns']} / {f['turns']} measured turns in {args.turns_per_client} "
        "alternating rounds after 1 warm-up turn per client =="
    )
    rows = [
        ("TTFT over ideal p50/p99 ms", over(t["ttft"], ideal.ttft), over(f["ttft"], ideal.ttft)),
        ("turn over ideal p50/p99 ms", over(t["turn"], ideal.turn), over(f["turn"], ideal.turn)),
        ("errors", str(len(t["errors"])), str(len(f["errors"]))),
    ]
    for name in t["cpu_ms"]:
        rows.append((f"CPU ms/turn: {name}", fmt(t["cpu_ms"][name]), "-"))
    rows.append(
        (
            "CPU ms/turn: all",
            fmt(sum(t["cpu_ms"].values())),
            fmt(sum(f["cpu_ms"].values())),
        )
    )
    p50, p99, count = t["pickup"]
    rows.append(
        (
            f"pickup p50/p99 ms (n={count})",
            f"{fmt(None if p50 is None else p50 * 1000)} / "
            f"{fmt(None if p99 is None else p99 * 1000)}",
            "-",
        )
    )
    rows.append(("load generator CPU % of one core", fmt(t["loadgen_pct"]), fmt(f["loadgen_pct"])))
    width = max(len(r[0]) for r in rows)
    print(f"  {'':{width}}  {'topology':>16}  {'fastapi':>16}")
    for label, a, b in rows:
        print(f"  {label:{width}}  {a:>16}  {b:>16}")
    print(f"  {ideal.explain()}")
    for name, s in (("topology", t), ("fastapi", f)):
        for kind in sorted({(e or "")[:200] for e in s["errors"]})[:5]:
            print(f"  {name} error: {kind}")
    sys.stdout.flush()


@contextlib.contextmanager
def backend(workdir: Path, delay: float) -> Iterator[Backend]:
    env = _server_env(workdir)
    env.update(
        DEBUG="false",
        SECRET_KEY="topology-cost-" + secrets.token_urlsafe(48),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        LOG_LEVEL="WARNING",
        AGENT_OFFLINE_TOKEN_DELAY=str(delay),
        # The check still runs (and counts) every turn; only its ceiling is out of reach.
        AGENT_RATE_LIMIT_PER_MINUTE="10000000",
    )
    redis = RedisServer(workdir)
    redis.start()
    try:
        with postgres_database("bench_topology") as url:
            env.update(DATABASE_URL=url, AGENT_REDIS_URL=redis.url)
            yield Backend("postgres", env, database=url.rsplit("/", 1)[1], redis=redis)
    finally:
        redis.kill()


def prepare_users(env: dict[str, str], users: int, per_user: int) -> None:
    script = PREPARE_SCRIPT.format(users=users, password=PASSWORD, per_user=per_user)
    # The topology migrated the database already; migrate again is a no-op.
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"Preparing the users failed:\n{done.stderr.decode()[-3000:]}")


async def measure(args: argparse.Namespace, concurrency: int, workdir: Path, data: Backend) -> None:
    users = min(concurrency, args.users)
    per_user = math.ceil(concurrency / users)
    ideal = ideal_for(data.env, args.delay)
    topology_env = {
        **data.env,
        "TOPOLOGY_WEB": str(args.web),
        "TOPOLOGY_WORKERS": str(args.workers),
        "TOPOLOGY_EXECUTOR": args.executor,
        "TOPOLOGY_DATABASE_URL": data.env["DATABASE_URL"],
        "TOPOLOGY_REDIS_URL": data.env["AGENT_REDIS_URL"],
        "TOPOLOGY_API_RATE": "100000r/s",
        "AGENT_WORKER_CONCURRENCY": str(math.ceil(concurrency / max(args.workers, 1)) + 20),
    }
    topology = Topology(workdir, topology_env)
    fastapi_port = _free_port()
    fastapi = None
    try:
        topology.script("up")
        prepare_users(data.env, users, per_user)
        fastapi = spawn(fastapi_command(fastapi_port), data.env, workdir / "fastapi.log")
        wait_until_up(f"http://127.0.0.1:{fastapi_port}/healthz", fastapi, workdir / "fastapi.log")
        site = await asyncio.to_thread(ThroughNginx, topology, users)
        ours = await asyncio.to_thread(site.clients, concurrency)
        bare: list[Client] = [
            FastAPIClient(fastapi_port, str(uuid.uuid4())) for _ in range(concurrency)
        ]
        for clients in (ours, bare):
            errors = await open_clients(clients)
            if errors:
                raise RuntimeError(f"{len(errors)} clients could not connect: {errors[0]}")
            warmed = await _gather_limited([partial(_warm, c, 1) for c in clients], concurrency)
            failed = [e for e in warmed if isinstance(e, Exception)]
            if failed:
                raise RuntimeError(f"{len(failed)} warm-up turns failed: {failed[0]}")
        groups = {
            "web": topology.pids("web"),
            "worker": topology.pids("worker"),
            "nginx": topology.pids("nginx"),
        }
        assert data.redis is not None and data.redis.process is not None
        redis_pid = data.redis.process.pid
        windows: dict[str, list[Window]] = {"topology": [], "fastapi": []}
        for _ in range(args.turns_per_client):
            database = DatabaseCPU(data.database) if data.database else None
            redis_before = process_cpu(redis_pid)
            with profiled(groups, args.profile, concurrency):
                measured = await window(ours, groups, database, data.env["DATABASE_URL"])
            measured.cpu["redis"] = process_cpu(redis_pid) - redis_before
            windows["topology"].append(measured)
            if database:
                database.close()
            windows["fastapi"].append(await window(bare, {"server": [fastapi.pid]}, None, None))
        await close_clients(ours)
        await close_clients(bare)
        report(
            concurrency,
            summary(windows["topology"], ideal),
            summary(windows["fastapi"], ideal),
            args,
        )
    finally:
        if fastapi is not None:
            stop(fastapi)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(topology.script, "down")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[200])
    parser.add_argument("--delay", type=float, default=0.05, help="token delay (s)")
    parser.add_argument("--turns-per-client", type=int, default=2, help="measured rounds")
    parser.add_argument("--users", type=int, default=20, help="logged-in users the clients share")
    parser.add_argument("--web", type=int, default=2, help="web instances")
    parser.add_argument("--workers", type=int, help="worker processes (2; inline: 0)")
    parser.add_argument(
        "--executor",
        choices=["queue", "inline"],
        default="queue",
        help="inline: the web instances execute the runs (no workers), for comparison",
    )
    parser.add_argument("--keep-logs", help="copy the topology's logs into this directory")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="sample the first web instance and the first worker with py-spy during the "
        "measured windows (collapsed stacks; benchmarks/profile_summary.py summarizes them)",
    )
    args = parser.parse_args()
    if args.workers is None:
        args.workers = 2 if args.executor == "queue" else 0
    print(f"topology_cost: serving {ROOT} through scripts/topology.sh")
    try:
        for concurrency in args.concurrency:
            with tempfile.TemporaryDirectory(prefix="topology-cost-") as tmp:
                workdir = Path(tmp)
                try:
                    with backend(workdir, args.delay) as data:
                        asyncio.run(measure(args, concurrency, workdir, data))
                finally:
                    if args.keep_logs:
                        keep_logs(
                            workdir / "topology" / "logs", Path(args.keep_logs), f"c{concurrency}"
                        )
    finally:
        stop_all_children()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
