"""The real PostgreSQL and Redis the tests talk to, and whether they are up. Tests that
need one skip loudly, naming it, when it is not."""

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import redis

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
# Database 15: the tests' keys never mix with a developer's.
REDIS_URL = "redis://127.0.0.1:6379/15"


def postgres_available() -> bool:
    try:
        psycopg.connect(POSTGRES, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


def redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A database of its own on the shared server, named `<prefix>_<random>`, dropped
    after (with whatever still holds a connection to it); yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
