"""Rows every turn reads and operators rarely change (limits, prices), kept in the Django
cache: local memory in the monolith, Redis shared by every instance when
AGENT_REDIS_URL is set.

Invalidation is by version, not by key: each group of entries has a version key, every
entry is stored with the version it was read under and is used only while that version
is current, so one write drops the whole group in every process that shares the cache.
A local-memory cache is shared by nobody: a process that did not make the change (a
second process without Redis) keeps its entries until they expire, so they live only
`TTL` seconds: how long such a process may act on an old limit or price.
"""

from collections.abc import Callable
from typing import TypeVar
from uuid import uuid4

from django.core.cache import cache
from django.db import transaction

TTL = 60

T = TypeVar("T")


def cache_versioned_get(*, group: str, key: str, read: Callable[[], T]) -> T:
    """The entry `key` of `group` if it was stored under the group's current version;
    else `read()`, stored for next time (once committed). One cache round trip on a hit."""
    version_key = f"{group}:version"
    entry_key = f"{group}:{key}"
    found = cache.get_many([version_key, entry_key])
    version = found.get(version_key)
    if version is None:
        # First use (or evicted): a new version, which no stored entry can carry.
        version = uuid4().hex
        if not cache.add(version_key, version, timeout=None):
            version = cache.get(version_key, version)
    entry = found.get(entry_key)
    if entry is not None and entry[0] == version:
        return entry[1]
    # The version was read before the row: a change committed in between has set a
    # newer one, so what is read now is never kept under the new version.
    value = read()
    # Kept once the caller's transaction commits (at once outside one): what it read may
    # be its own writes (a user's account, created on first need), which a rollback
    # undoes, and other processes must never be handed a row that does not exist.
    transaction.on_commit(lambda: cache.set(entry_key, (version, value), TTL))
    return value


def cache_versioned_invalidate(*, group: str) -> None:
    """Drop every entry of `group`: now, and again once the caller's transaction commits
    (a reader between the two may have stored the row as it was before the commit)."""
    version_key = f"{group}:version"
    cache.set(version_key, uuid4().hex, timeout=None)
    transaction.on_commit(lambda: cache.set(version_key, uuid4().hex, timeout=None))
