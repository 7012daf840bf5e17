"""How the JSON API authenticates (the classes in agentsite.api.AUTH). Every request
they let in counts against the caller's requests-per-minute limits (ratelimit.py)."""

from typing import Any

from django.conf import settings
from django.http import HttpRequest
from ninja.errors import HttpError
from ninja.security import APIKeyHeader
from ninja.security import SessionAuth as NinjaSessionAuth

from agentsite.errors import ApplicationError

from .models import ApiKey
from .ratelimit import rate_limit_hit, rate_limit_hit_for_user
from .services import api_key_verify


class SessionAuth(NinjaSessionAuth):
    """ninja's `django_auth` (a signed-in browser session, CSRF-checked), counted
    against the user's account."""

    def _get_key(self, request: HttpRequest) -> str | None:
        # No session cookie, no session to protect: a caller without credentials is
        # told 401 (sign in), not 403 for a missing CSRF token.
        if self.param_name not in request.COOKIES:
            return None
        try:
            return super()._get_key(request)
        except HttpError as error:  # ninja's CSRF refusal, in the API's error shape
            raise ApplicationError(
                "csrf_failed",
                "A signed-in browser must send its CSRF token (the X-CSRFToken header) "
                "with unsafe methods.",
                http_status=403,
            ) from error

    def authenticate(self, request: HttpRequest, key: str | None) -> Any:
        user = super().authenticate(request, key)
        if user is not None:
            rate_limit_hit_for_user(user_id=user.pk)
        return user


class ApiKeyAuth(APIKeyHeader):
    """Accepts a key sent in the `AGENT_API_KEY_HEADER` header.

    No header: None, so the next class in AUTH may try. A header with a bad key: a 401
    `invalid_api_key` error at once, rather than the generic "sign in" answer, so a
    client learns its key is the problem. On success `request.auth` is the key and
    `request.user` its user, so endpoints scope ownership the same way for sessions and
    keys."""

    param_name = settings.AGENT_API_KEY_HEADER

    def authenticate(self, request: HttpRequest, key: str | None) -> ApiKey | None:
        if not key:
            return None
        api_key = api_key_verify(raw_key=key)
        # After verifying: a bad key must not spend anyone's allowance.
        rate_limit_hit(account=api_key.account, api_key=api_key)
        request.user = api_key.created_by
        return api_key


def api_key_of(request: HttpRequest) -> ApiKey | None:
    """The key the request authenticated with, if it used one (not a session)."""
    auth = getattr(request, "auth", None)
    return auth if isinstance(auth, ApiKey) else None


def api_key_require_scope(request: HttpRequest, scope: str) -> None:
    """Refuse a key-authenticated request whose key lacks `scope`; sessions pass."""
    api_key = api_key_of(request)
    if api_key is not None and scope not in api_key.scopes:
        raise ApplicationError(
            "insufficient_scope",
            f"This API key lacks the {scope!r} scope.",
            http_status=403,
        )
