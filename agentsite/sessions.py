"""Django's cached database sessions, refusing a cookie that cannot be a session key."""

from django.contrib.sessions.backends.base import VALID_KEY_CHARS
from django.contrib.sessions.backends.cached_db import SessionStore as CachedDatabaseSessionStore


class SessionStore(CachedDatabaseSessionStore):
    """Sessions are read on every page and every WebSocket handshake: from the cache
    (written through on every save, so still in the database for every instance and
    after a restart), not with a query each.

    Django looks up any session cookie of 8 characters or more. A quoted cookie may
    carry a NUL (`sessionid="abcdefgh\\000"`), which PostgreSQL refuses in a query, so
    every page and WebSocket handshake answered 500, even to a visitor who never logged
    in. A key Django could not have made is no session: the visitor is not logged in
    (and the key reaches neither the database nor the cache)."""

    def _validate_session_key(self, key: str | None) -> bool:
        # Django's own rule first (django-stubs does not know this private method).
        valid = super()._validate_session_key(key)  # type: ignore[misc]
        return bool(valid) and set(key or "") <= _KEY_CHARS


_KEY_CHARS = set(VALID_KEY_CHARS)
