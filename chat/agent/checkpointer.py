"""LangGraph's official checkpoint savers: SQLite by default, Postgres when the database is.

Conversation state lives here, never in process memory, so any instance can continue any
conversation and a restart loses nothing. Async savers hold connections bound to one
event loop, so a Postgres pool is kept per loop.
"""

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
from django.conf import settings
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

_savers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BaseCheckpointSaver] = (
    weakref.WeakKeyDictionary()
)
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def uses_postgres() -> bool:
    return "postgresql" in settings.DATABASES["default"]["ENGINE"]


def postgres_conninfo() -> str:
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

    PostgreSQL: a connection pool shared by the runs of an event loop. SQLite: a
    connection per run, closed at its end, because aiosqlite's worker thread would keep
    the process from exiting (opening one costs ~1.5 ms, nothing next to a model call).
    """
    if uses_postgres():
        loop = asyncio.get_running_loop()
        lock = _locks.setdefault(loop, asyncio.Lock())
        async with lock:
            if loop not in _savers:
                _savers[loop] = await open_saver(postgres=postgres_conninfo(), sqlite_path=None)
        yield _savers[loop]
        return
    saver = await open_saver(postgres=None, sqlite_path=_sqlite_path())
    try:
        yield saver
    finally:
        await saver.conn.close()  # type: ignore[attr-defined]


async def open_saver(*, postgres: str | None, sqlite_path: Path | None) -> BaseCheckpointSaver:
    """A ready saver: on PostgreSQL when `postgres` (a conninfo) is given, else SQLite."""
    saver: BaseCheckpointSaver
    if postgres:
        pool: AsyncConnectionPool = AsyncConnectionPool(
            postgres,
            open=False,
            max_size=10,
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
        )
        await pool.open()
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
        await saver.setup()
    else:
        assert sqlite_path is not None
        connection = await aiosqlite.connect(sqlite_path)
        saver = AsyncSqliteSaver(connection)
        await saver.setup()
    return saver


def delete_thread(thread_id: str) -> None:
    """Forget a conversation's agent memory (called from sync code, outside any loop)."""
    if uses_postgres():
        with PostgresSaver.from_conn_string(postgres_conninfo()) as saver:
            saver.setup()
            saver.delete_thread(thread_id)
    else:
        with SqliteSaver.from_conn_string(str(_sqlite_path())) as saver:
            saver.delete_thread(thread_id)
