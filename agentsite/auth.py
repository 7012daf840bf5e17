"""Who is calling the JSON API, and what they may touch: the one policy every router uses.

The auth classes (billing.auth, composed in agentsite.api.AUTH) verify a credential and
set `request.auth` to a `Principal`; an operation reads it with `principal(request)` or
`require_scope(request, scope)`, and looks objects up with `owned_or_404`, so an API key
and a browser session see exactly the same things: what their user owns.

A Principal is plain values, resolved while authenticating (in a worker thread for
async operations too), so reading it never touches the database: an `async def`
operation can use it without a thread hop.
"""

from dataclasses import dataclass
from typing import Any, TypeVar

from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db.models import Model, QuerySet, TextChoices
from django.http import HttpRequest

from .errors import ApplicationError

M = TypeVar("M", bound=Model)


class Scope(TextChoices):
    """What an API key may do (`require_scope`); a browser session may do all of it.
    billing.models.ApiKey.Scope is this class, so routers name scopes without billing."""

    # Conversations too: a key that may run the agent opens, reads and deletes the
    # conversations it runs in. Managing keys is no scope: only a browser session may.
    RUNS = "runs"
    TRACES = "traces"
    USAGE = "usage"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a user acting within their account, through an API key
    (`api_key_id`, limited to its `scopes`) or a browser session (`api_key_id` None,
    `scopes` None: every scope)."""

    user_id: int
    account_id: int
    api_key_id: int | None
    scopes: frozenset[str] | None

    def has_scope(self, scope: str) -> bool:
        return self.scopes is None or scope in self.scopes


def principal(request: HttpRequest) -> Principal:
    """The caller the API's auth let in. Raises 401 `unauthenticated` on a request no
    auth class handled (an operation declared with `auth=None` has no caller)."""
    auth = getattr(request, "auth", None)
    if not isinstance(auth, Principal):
        raise ApplicationError("unauthenticated", "Sign in or send an API key.", http_status=401)
    return auth


def require_scope(request: HttpRequest, scope: Scope) -> Principal:
    """The caller, if it may act in `scope` (a session may do anything its user may);
    else 403 `insufficient_scope`."""
    caller = principal(request)
    if not caller.has_scope(scope):
        raise ApplicationError(
            "insufficient_scope", f"This API key lacks the {scope.value!r} scope.", http_status=403
        )
    return caller


def _owned(
    queryset: QuerySet[M], *, user_id: int | None, owner_field: str, lookup: dict[str, Any]
) -> QuerySet[M]:
    # Owned by the user, not merely in the account: a key acts as the user who made it,
    # and one member of an account does not read another's conversations. Another
    # account's objects are therefore never reachable either. No user (anonymous): none.
    return queryset.filter(**{f"{owner_field}_id": user_id}, **lookup)


def not_found(name: str) -> ApplicationError:
    return ApplicationError("not_found", f"There is no such {name}.", http_status=404)


# Missing, or a malformed id (what its lookup raises): the same 404 either way, not a
# 500/422 that would tell a probe anything.
_NOT_FOUND_ERRORS = (ObjectDoesNotExist, ValidationError, ValueError)


def object_or_404(queryset: QuerySet[M], *, name: str, **lookup: Any) -> M:
    """The one object of `queryset` (already narrowed to what the caller may see)
    matching `lookup`; anything else — missing, malformed id, not the caller's — is the
    same 404 `not_found` ("There is no such {name}."), so ids cannot be probed for
    existence. The one definition of "another's object is not found": `owned_or_404`
    and the selectors that narrow by something other than an owning user (an account's
    API keys) use it."""
    try:
        return queryset.get(**lookup)
    except _NOT_FOUND_ERRORS as error:
        raise not_found(name) from error


def user_owned_or_404(
    queryset: QuerySet[M],
    *,
    user_id: int | None,
    name: str,
    owner_field: str = "owner",
    **lookup: Any,
) -> M:
    """`owned_or_404` for a caller known by its user only (a browser page, a WebSocket,
    the OpenAI endpoint's bound conversation); `user_id` None (anonymous) owns nothing."""
    return object_or_404(
        _owned(queryset, user_id=user_id, owner_field=owner_field, lookup={}), name=name, **lookup
    )


def owned_or_404(
    queryset: QuerySet[M],
    *,
    principal: Principal,
    name: str,
    owner_field: str = "owner",
    **lookup: Any,
) -> M:
    """The one object of `queryset` matching `lookup` that `principal`'s user owns
    (`owner_field` is the path to the owning user's FK: "owner" for a Conversation,
    "conversation__owner" for a Run, "user" for a Trace). Anything else — missing, malformed
    id, someone else's — is the same 404 `not_found` ("There is no such {name}."), so
    ids cannot be probed for existence."""
    return user_owned_or_404(
        queryset, user_id=principal.user_id, name=name, owner_field=owner_field, **lookup
    )


async def aowned_or_404(
    queryset: QuerySet[M],
    *,
    principal: Principal,
    name: str,
    owner_field: str = "owner",
    **lookup: Any,
) -> M:
    """`owned_or_404` for async operations (one query on the async ORM)."""
    try:  # (a malformed id fails in filter(), before the query)
        owned = _owned(queryset, user_id=principal.user_id, owner_field=owner_field, lookup=lookup)
        return await owned.aget()
    except _NOT_FOUND_ERRORS as error:
        raise not_found(name) from error
