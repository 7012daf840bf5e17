"""Cursor (keyset) pagination for the JSON API's lists.

A page ends where its last row sorts; the next page starts strictly after that row in
the list's order. Unlike an offset, a row added or removed meanwhile neither repeats nor
skips a row on later pages, and the query costs the same on page 1 and page 1000.

The cursor is the last row's sort values, signed (Django's `signing`, keyed with
SECRET_KEY): opaque to clients, and one that was altered or made up is refused
(400 `invalid_cursor`) instead of reaching the database."""

import operator
from dataclasses import dataclass
from datetime import datetime
from functools import reduce
from typing import Any, Generic, TypeVar, cast
from uuid import UUID

from django.core import signing
from django.core.exceptions import ValidationError
from django.db.models import Field as ModelField
from django.db.models import Model, Q, QuerySet
from ninja import Field, Schema

from .errors import ApplicationError

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

M = TypeVar("M", bound=Model)


class PageParams(Schema):
    cursor: str | None = Field(
        None,
        description="The `next_cursor` of the previous page; leave it out (or empty) for "
        "the first page.",
    )
    limit: int = Field(
        DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Items on this page, at most."
    )


@dataclass(frozen=True)
class Page(Generic[M]):
    items: list[M]
    # Null on the last page.
    next_cursor: str | None


def paginate(
    queryset: QuerySet[M], *, ordering: tuple[str, ...], params: PageParams, salt: str
) -> Page[M]:
    """One page of `queryset` sorted by `ordering` (Django's "-field" for descending),
    whose fields together must identify a row (end it with the primary key), so ties
    never repeat or lose rows across pages.

    `salt` names the list: a cursor is valid only for the list that issued it (e.g.
    "chat.messages:<conversation id>"), so a cursor of one conversation's messages cannot
    be replayed against another's."""
    fields = [name.removeprefix("-") for name in ordering]
    if params.cursor:
        after = _cursor_load(queryset.model, fields, params.cursor, salt)
        queryset = queryset.filter(_after(ordering, after))
    # One row more than asked tells whether a next page exists, without a count.
    rows = list(queryset.order_by(*ordering)[: params.limit + 1])
    items = rows[: params.limit]
    next_cursor = None
    if len(rows) > params.limit:
        next_cursor = signing.dumps(
            [_jsonable(getattr(items[-1], name)) for name in fields], salt=_salt(salt)
        )
    return Page(items=items, next_cursor=next_cursor)


def _after(ordering: tuple[str, ...], values: list[Any]) -> Q:
    """Rows that sort after `values`: (a, b) > (x, y) is a > x, or a = x and b > y."""
    beyond = []
    equal = Q()
    for name, value in zip(ordering, values, strict=True):
        field = name.removeprefix("-")
        comparison = "lt" if name.startswith("-") else "gt"
        beyond.append(equal & Q(**{f"{field}__{comparison}": value}))
        equal &= Q(**{field: value})
    return reduce(operator.or_, beyond)


def _cursor_load(model: type[Model], fields: list[str], cursor: str, salt: str) -> list[Any]:
    invalid = ApplicationError(
        "invalid_cursor",
        "The cursor is not one this list issued; start again without it.",
        http_status=400,
    )
    try:
        values = signing.loads(cursor, salt=_salt(salt))
    except signing.BadSignature as error:
        raise invalid from error
    # Signed by us for this list, so well-formed unless the list's order changed since.
    if not isinstance(values, list) or len(values) != len(fields):
        raise invalid
    try:
        return [
            cast(ModelField, model._meta.get_field(name)).to_python(value)
            for name, value in zip(fields, values, strict=True)
        ]
    except ValidationError as error:
        raise invalid from error


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value


def _salt(salt: str) -> str:
    return f"agentsite.pagination:{salt}"
