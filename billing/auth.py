"""How the JSON API authenticates: the classes agentsite.api composes into its AUTH.

Each turns a credential into an `agentsite.auth.Principal` (plain values, so async
operations read it without touching the database; ninja runs these sync callbacks in a
worker thread for them). Every request they let in counts against the caller's
requests-per-minute limits (ratelimit.py), after it is verified: a bad key must not
spend anyone's allowance.

No credential: None, so the next class may try, and with none left the answer is 401
`unauthenticated`. A credential that is wrong: its own 401 at once (`invalid_api_key`,
`api_key_revoked`, `api_key_expired`), rather than the generic answer, so a client
learns its key is the problem.
"""

from django.conf import settings
from django.http import HttpRequest
from ninja.errors import HttpError
from ninja.security import APIKeyHeader, HttpBearer
from ninja.security import SessionAuth as NinjaSessionAuth

from agentsite.auth import Principal
from agentsite.errors import ApplicationError

from .ratelimit import rate_limit_hit, rate_limit_hit_for_user
from .services import api_key_verify


def _key_principal(request: HttpRequest, raw_key: str) -> Principal:
    api_key = api_key_verify(raw_key=raw_key)
    rate_limit_hit(account=api_key.account, api_key=api_key)
    # The key acts as its user: code that reads request.user sees them, not anonymity.
    request.user = api_key.created_by
    return Principal(
        user_id=api_key.created_by_id,
        account_id=api_key.account_id,
        api_key_id=api_key.pk,
        scopes=frozenset(api_key.scopes),
    )


class ApiKeyHeaderAuth(APIKeyHeader):
    """A key in the `AGENT_API_KEY_HEADER` header (default `X-API-Key`)."""

    param_name = settings.AGENT_API_KEY_HEADER

    def authenticate(self, request: HttpRequest, key: str | None) -> Principal | None:
        return _key_principal(request, key) if key else None


class ApiKeyBearerAuth(HttpBearer):
    """A key as `Authorization: Bearer <key>`: what OpenAI's SDKs and most HTTP
    clients send."""

    def authenticate(self, request: HttpRequest, token: str) -> Principal | None:
        return _key_principal(request, token)


class SessionAuth(NinjaSessionAuth):
    """A signed-in browser session, CSRF-checked for unsafe methods (by ninja), counted
    against the user's account."""

    def __call__(self, request: HttpRequest) -> Principal | None:
        # Anonymous: no session to protect, so the answer is 401 `unauthenticated`, not
        # a CSRF failure (ninja checks CSRF before it looks at the user).
        if not request.user.is_authenticated:
            return None
        try:
            return super().__call__(request)  # type: ignore[no-any-return]
        except HttpError as error:  # ninja's CSRF refusal, in the API's own words
            raise ApplicationError(
                "csrf_failed",
                "The CSRF check failed: send the csrftoken cookie's value in the "
                "X-CSRFToken header, or use an API key.",
                http_status=403,
            ) from error

    def authenticate(self, request: HttpRequest, key: str | None) -> Principal | None:
        user = request.user
        if not user.is_authenticated:
            return None
        quotas = rate_limit_hit_for_user(user_id=user.pk)
        return Principal(
            user_id=user.pk, account_id=quotas.account_id, api_key_id=None, scopes=None
        )
