"""What do a turn's LangGraph checkpoints cost? Per durability mode, per saver, one process.

    .venv/bin/python benchmarks/checkpoint_cost.py [--threads N] [--turns N] [--postgres URL]
    .venv/bin/python benchmarks/checkpoint_cost.py --concurrent 100 [--rounds N] [--postgres URL]

Drives the agent graph alone (no Django run, no events, no trace) with the built-in
offline model and no token delay, one tool-using turn at a time ("What is 17 * 23?":
model -> calculator -> model). Each of N conversations gets `--turns` turns, so later
turns carry a longer history, as real conversations do. For each saver (SQLite file,
and PostgreSQL when `--postgres` names a server: a database of its own is created and
dropped) and each durability mode ("sync", "async" = LangGraph's default, "exit"), the
turns are interleaved so drift in the machine affects all modes alike. An in-memory
saver runs alongside as the reference: the graph's own work with no storage.

Per turn: the saver calls LangGraph made (checkpoint puts, put_writes, reads), the rows
and bytes they added, the wall time of a turn and the process CPU time (which includes
aiosqlite's thread and psycopg's work; the PostgreSQL server's own CPU is not counted).

With `--concurrent C`: C turns at once on one saver per mode ("sync", "async"), each on
a new conversation, with the model's tokens paced 50 ms apart, as the savers are shared
in a server (one SQLite connection, one PostgreSQL pool); time to first token and turn
time, p50 and p99, alternating between the modes for `--rounds` rounds.
"""

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.test_settings")
os.environ["LOG_LEVEL"] = "WARNING"

MESSAGE = "What is 17 * 23?"
MODES = ("sync", "async", "exit")
COUNTED = ("aput", "aput_writes", "aget_tuple")


def count_calls(saver: Any, calls: Counter[str]) -> None:
    """Count the saver's calls (functools.wraps keeps the signature LangGraph inspects)."""
    for name in COUNTED:
        method = getattr(saver, name)

        @functools.wraps(method)
        async def counted(*args: Any, _method: Any = method, _name: str = name, **kw: Any) -> Any:
            calls[_name] += 1
            return await _method(*args, **kw)

        setattr(saver, name, counted)


async def stored(saver: Any, backend: str) -> tuple[int, int, int]:
    """(checkpoint rows, write rows, bytes) the saver holds."""
    if backend == "sqlite":
        cursor = await saver.conn.execute(
            "SELECT (SELECT count(*) FROM checkpoints), (SELECT count(*) FROM writes),"
            " (SELECT coalesce(sum(length(checkpoint) + length(metadata)), 0) FROM checkpoints)"
            " + (SELECT coalesce(sum(length(value)), 0) FROM writes)"
        )
        row = await cursor.fetchone()
        return row[0], row[1], row[2]
    async with saver.conn.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT (SELECT count(*) FROM checkpoints)"
                " + (SELECT count(*) FROM checkpoint_blobs) AS checkpoints,"
                " (SELECT count(*) FROM checkpoint_writes) AS writes,"
                " (SELECT coalesce(sum(pg_column_size(checkpoints.*)), 0) FROM checkpoints)"
                " + (SELECT coalesce(sum(pg_column_size(checkpoint_blobs.*)), 0)"
                "    FROM checkpoint_blobs)"
                " + (SELECT coalesce(sum(pg_column_size(checkpoint_writes.*)), 0)"
                "    FROM checkpoint_writes) AS bytes"
            )
        ).fetchone()
        return row["checkpoints"], row["writes"], row["bytes"]


async def main(threads: int, turns: int, postgres: str | None) -> None:
    import django

    django.setup()
    from langchain_core.messages import HumanMessage
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Durability

    from chat.agent.checkpointer import open_saver
    from chat.agent.context import Context
    from chat.agent.graph import build_graph

    workdir = tempfile.mkdtemp(prefix="checkpoint-cost-")
    backends: dict[tuple[str, str], Any] = {}
    for mode in MODES:
        # One file per mode, so one mode's rows are counted alone.
        path = Path(workdir) / f"{mode}.sqlite3"
        backends[("sqlite", mode)] = await open_saver(postgres=None, sqlite_path=path)
        if postgres:
            # One database for all modes: rows are counted by difference, turn by turn.
            backends[("postgres", mode)] = await open_saver(postgres=postgres, sqlite_path=None)
    backends[("memory", "-")] = InMemorySaver()

    calls: dict[Any, Counter[str]] = {key: Counter() for key in backends}
    graphs = {}
    for key, saver in backends.items():
        if key[0] != "memory":
            count_calls(saver, calls[key])
        graphs[key] = build_graph(saver)
    wall: dict[Any, list[float]] = {key: [] for key in backends}
    cpu: dict[Any, list[float]] = {key: [] for key in backends}
    rows: dict[Any, list[int]] = {key: [0, 0, 0] for key in backends}

    thread_ids = {key: [str(uuid.uuid4()) for _ in range(threads)] for key in backends}
    for _ in range(turns):
        for index in range(threads):
            for key, graph in graphs.items():
                backend, mode = key
                thread_id = thread_ids[key][index]
                context = Context(
                    run_id=uuid.uuid4(),
                    conversation_id=uuid.UUID(thread_id),
                    user_id=1,
                    max_steps=10,
                    context_tokens=100_000,
                )
                before = await stored(backends[key], backend) if backend != "memory" else None
                started, started_cpu = time.perf_counter(), time.process_time()
                await graph.ainvoke(
                    {"messages": [HumanMessage(MESSAGE)], "steps": 0},
                    {"configurable": {"thread_id": thread_id}},
                    context=context,
                    durability=None if backend == "memory" else cast(Durability, mode),
                )
                wall[key].append(time.perf_counter() - started)
                cpu[key].append(time.process_time() - started_cpu)
                if before is not None:
                    after = await stored(backends[key], backend)
                    for i in range(3):
                        rows[key][i] += after[i] - before[i]

    total = threads * turns
    print(f"{total} tool-using turns per row ({threads} conversations x {turns} turns each)")
    print(
        f"{'saver':9} {'durability':10} {'puts':>5} {'writes':>6} {'reads':>5}"
        f" {'ckpt rows':>9} {'write rows':>10} {'KiB':>6}"
        f" {'wall ms p50':>11} {'cpu ms mean':>11}"
    )
    for key in backends:
        backend, mode = key
        per = calls[key]
        print(
            f"{backend:9} {mode:10} {per['aput'] / total:5.1f} {per['aput_writes'] / total:6.1f}"
            f" {per['aget_tuple'] / total:5.1f} {rows[key][0] / total:9.1f}"
            f" {rows[key][1] / total:10.1f} {rows[key][2] / total / 1024:6.1f}"
            f" {statistics.median(wall[key]) * 1000:11.2f}"
            f" {statistics.mean(cpu[key]) * 1000:11.2f}"
        )
    closed = set()
    for saver in backends.values():
        conn = getattr(saver, "conn", None)
        if conn is not None and id(conn) not in closed:
            closed.add(id(conn))
            await conn.close()


async def one_paced_turn(
    graph: Any, mode: str | None, ttft: list[float], turn: list[float]
) -> None:
    from langchain_core.messages import AIMessageChunk, HumanMessage

    from chat.agent.context import Context

    thread_id = uuid.uuid4()
    context = Context(
        run_id=uuid.uuid4(),
        conversation_id=thread_id,
        user_id=1,
        max_steps=10,
        context_tokens=100_000,
    )
    started, first = time.perf_counter(), None
    parts = graph.astream(
        {"messages": [HumanMessage(MESSAGE)], "steps": 0},
        {"configurable": {"thread_id": str(thread_id)}},
        context=context,
        stream_mode="messages",
        durability=mode,
    )
    async for chunk, _ in parts:
        if first is None and isinstance(chunk, AIMessageChunk) and chunk.text:
            first = time.perf_counter() - started
    ttft.append(first or 0.0)
    turn.append(time.perf_counter() - started)


async def concurrent(clients: int, rounds: int, postgres: str | None) -> None:
    import django
    from django.conf import settings

    django.setup()
    from langgraph.checkpoint.memory import InMemorySaver

    from chat.agent.checkpointer import open_saver
    from chat.agent.graph import build_graph

    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    workdir = Path(tempfile.mkdtemp(prefix="checkpoint-cost-"))
    keys = [("sqlite", "sync"), ("sqlite", "async")]
    if postgres:
        keys += [("postgres", "sync"), ("postgres", "async")]
    keys.append(("memory", "-"))
    results: dict[Any, tuple[list[float], list[float]]] = {key: ([], []) for key in keys}
    for round_ in range(rounds):
        for key in keys:
            backend, mode = key
            saver: Any
            if backend == "memory":
                saver = InMemorySaver()
            else:
                path = workdir / f"{mode}-{round_}.sqlite3"
                saver = await open_saver(
                    postgres=postgres if backend == "postgres" else None, sqlite_path=path
                )
            graph = build_graph(saver)
            ttft, turn = results[key]
            durability = None if backend == "memory" else mode
            await asyncio.gather(
                *(one_paced_turn(graph, durability, ttft, turn) for _ in range(clients))
            )
            if backend != "memory":
                await saver.conn.close()

    def ms(values: list[float], q: float) -> float:
        return sorted(values)[int(q * (len(values) - 1))] * 1000

    print(f"{clients} concurrent tool-using turns x {rounds} rounds, tokens 50 ms apart")
    print(f"{'saver':9} {'durability':10} {'TTFT p50/p99 ms':>17} {'turn p50/p99 ms':>17}")
    for (backend, mode), (ttft, turn) in results.items():
        print(
            f"{backend:9} {mode:10} {ms(ttft, 0.5):8.0f}/{ms(ttft, 0.99):<8.0f}"
            f" {ms(turn, 0.5):8.0f}/{ms(turn, 0.99):<8.0f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=10)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--postgres", help="a server URL; a database of its own is made")
    parser.add_argument("--concurrent", type=int, help="C paced turns at once instead")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --concurrent")
    args = parser.parse_args()

    def measure(postgres: str | None) -> None:
        if args.concurrent:
            asyncio.run(concurrent(args.concurrent, args.rounds, postgres))
        else:
            asyncio.run(main(args.threads, args.turns, postgres))

    if args.postgres:
        import tests.servers as servers

        # On the URL's server, a database named checkpoint_cost_<random>, dropped after.
        servers.POSTGRES = args.postgres
        with servers.postgres_database("checkpoint_cost") as url:
            measure(url)
    else:
        measure(None)
