"""LangGraph's official checkpoint savers: SQLite by default, Postgres when the database is.

Conversation state lives here, never in process memory, so any instance can continue any
conversation and a restart loses nothing. Async savers hold connections bound to one
event loop, so a Postgres pool is kept per loop.
"""

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiosqlite
from asgiref.sync import async_to_sync
from django.conf import settings
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.types import Durability

# When a run's steps are saved (LangGraph's `durability`). A tool-using turn (model, tool,
# model) saves 5 checkpoints and 4 sets of a step's writes in either mode that saves
# during the run, "sync" or "async": 3.7 to 4.9 ms more CPU per turn than an in-memory
# saver on SQLite, 8.8 to 10.5 ms on PostgreSQL (benchmarks/checkpoint_cost.py). "exit"
# saves one checkpoint per turn (under 1 ms), but a process that dies mid-run would
# leave nothing of the run to resume from. "sync" waits for each step's write before the
# next step: the same writes, and with 100 runs at once the first token came later (p50
# 0.9 s instead of 0.5 s on SQLite, 6.0 s instead of 1.1 s on PostgreSQL). "async"
# writes while the next step runs; its risk: a process killed in that moment resumes
# from the step before (a tool the model asked for may then be asked for again, under a
# new call id). LangGraph's default, named here so that a new default upstream cannot
# change unnoticed what a crash loses.
CHECKPOINT_DURABILITY: Durability = "async"

_savers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BaseCheckpointSaver] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class _SharedSqlite:
    saver: AsyncSqliteSaver
    runs: int = 0


_sqlite_savers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SharedSqlite] = (
    weakref.WeakKeyDictionary()
)
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def uses_postgres() -> bool:
    return "postgresql" in settings.DATABASES["default"]["ENGINE"]


def postgres_conninfo() -> str:
    # The Postgres imports are local: psycopg and its saver take about 12 MiB of memory
    # that a server on SQLite never needs.
    from psycopg.conninfo import make_conninfo

    db = settings.DATABASES["default"]
    return make_conninfo(
        dbname=db["NAME"],
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        host=db.get("HOST") or None,
        port=str(db["PORT"]) if db.get("PORT") else None,
    )


def _sqlite_path() -> Path:
    path = Path(settings.AGENT_CHECKPOINT_SQLITE_PATH)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.asynccontextmanager
async def checkpointer() -> AsyncIterator[BaseCheckpointSaver]:
    """The saver for one run.

    PostgreSQL: a connection pool shared by the runs of an event loop. SQLite: one
    connection shared by the runs of an event loop while any is in flight, closed when
    the last one ends, because aiosqlite's worker thread would keep the process from
    exiting. One connection, not one per run: the saver's lock queues the loop's writes
    in memory, where a connection per run made a hundred runs fight over the file lock
    and some failed with `database is locked`.
    """
    loop = asyncio.get_running_loop()
    lock = _locks.setdefault(loop, asyncio.Lock())
    if uses_postgres():
        async with lock:
            if loop not in _savers:
                _savers[loop] = await open_saver(postgres=postgres_conninfo(), sqlite_path=None)
        yield _savers[loop]
        return
    async with lock:
        shared = _sqlite_savers.get(loop)
        if shared is None:
            saver = await open_saver(postgres=None, sqlite_path=_sqlite_path())
            shared = _sqlite_savers[loop] = _SharedSqlite(cast(AsyncSqliteSaver, saver))
        shared.runs += 1
    try:
        yield shared.saver
    finally:
        shared.runs -= 1
        if shared.runs == 0:
            # Shielded: a cancelled run must not leave the connection (and its thread) open.
            await asyncio.shield(_close_when_idle(loop, shared, lock))


async def _close_when_idle(
    loop: asyncio.AbstractEventLoop, shared: _SharedSqlite, lock: asyncio.Lock
) -> None:
    async with lock:
        # A run that started meanwhile keeps it open.
        if shared.runs == 0 and _sqlite_savers.get(loop) is shared:
            del _sqlite_savers[loop]
            await shared.saver.conn.close()


async def open_saver(*, postgres: str | None, sqlite_path: Path | None) -> BaseCheckpointSaver:
    """A ready saver: on PostgreSQL when `postgres` (a conninfo) is given, else SQLite."""
    saver: BaseCheckpointSaver
    if postgres:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        pool: AsyncConnectionPool = AsyncConnectionPool(
            postgres,
            open=False,
            min_size=1,
            max_size=settings.AGENT_CHECKPOINT_POOL_SIZE,  # see DATABASE_POOL_SIZE
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
        )
        await pool.open()
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
        try:
            await _setup_alone(postgres, saver)
        except BaseException:
            await pool.close()
            raise
    else:
        assert sqlite_path is not None
        connection = await aiosqlite.connect(sqlite_path, **_sqlite_options())
        try:
            await connection.execute("PRAGMA synchronous=NORMAL")  # WAL: safe, shorter locks
            saver = _CommittingSqliteSaver(connection)
            await saver.setup()
        except BaseException:
            # A cancel or a lock timeout here must not leave its thread behind.
            await connection.close()
            raise
    return saver


# Any fixed number: the advisory lock that LangGraph's table set-up is done under.
_SETUP_LOCK = 0x61676E74


async def _setup_alone(postgres: str, saver: BaseCheckpointSaver) -> None:
    """The saver's `setup` (its migrations), one process at a time: processes starting
    together on a new database (two workers, two web instances) otherwise ran them at
    once, and all but one failed on their first runs (a duplicate migration row)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(postgres, autocommit=True) as lock:
        # Polled, not waited for in one statement: the set-up creates indexes
        # CONCURRENTLY, which waits for every transaction under way to end, a waiting
        # pg_advisory_lock() included (that hung both processes).
        while not await _try_lock(lock):  # noqa: ASYNC110 (a lock in another process)
            await asyncio.sleep(0.05)
        await saver.setup()  # type: ignore[attr-defined]


async def _try_lock(connection: Any) -> bool:
    cursor = await connection.execute("SELECT pg_try_advisory_lock(%s)", (_SETUP_LOCK,))
    row = await cursor.fetchone()
    return bool(row and row[0])


class _CommittingSqliteSaver(AsyncSqliteSaver):
    """LangGraph's saver, its writes shielded from cancels. A cancel (a user's stop, a
    deadline) that lands between a write's statement and its commit leaves the shared
    connection inside a write transaction, holding the file's write lock against every
    other connection, another process's or a later one's, until something commits on
    it; they wait out their busy timeout and fail with `database is locked`."""

    async def aput(self, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.shield(super().aput(*args, **kwargs))

    async def aput_writes(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.shield(super().aput_writes(*args, **kwargs))

    async def adelete_thread(self, thread_id: str) -> None:
        await asyncio.shield(super().adelete_thread(thread_id))


def _sqlite_options() -> dict[str, Any]:
    # Like Django's database: wait for another process's write instead of failing at
    # once, and take the write lock when a write transaction begins, so a write never
    # fails half-way and leaves the shared connection inside a transaction.
    return {"timeout": settings.SQLITE_TIMEOUT, "isolation_level": "IMMEDIATE"}


def delete_thread(thread_id: str) -> None:
    """Forget a conversation's agent memory (called from sync code, outside any loop)."""
    if uses_postgres():
        from langgraph.checkpoint.postgres import PostgresSaver

        with PostgresSaver.from_conn_string(postgres_conninfo()) as saver:
            saver.setup()
            saver.delete_thread(thread_id)
    else:
        # Through the serving loop's shared connection, queued behind the writes of the
        # runs in flight: a connection of its own had to wait for the file's write lock
        # while a run that was just cancelled still held it, and timed out
        # (`database is locked`). Without a serving loop, async_to_sync makes one.
        async_to_sync(forget_thread)(thread_id)


async def forget_thread(thread_id: str) -> None:
    """`delete_thread` from the event loop, through the loop's shared saver."""
    async with checkpointer() as saver:
        await saver.adelete_thread(thread_id)
