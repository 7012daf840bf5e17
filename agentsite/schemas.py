"""Schemas every router of the JSON API shares.

Interim: the auth work (agentsite/auth.py) brings the project's error schema and the
helper that declares an operation's error statuses; `ErrorOut` and `error_responses`
give way to them."""

from typing import Any

from ninja import Schema
from pydantic import ConfigDict


class BodyIn(Schema):
    """A request body: a JSON object of the declared fields only (422 otherwise).

    ninja's Schema reads its input by attribute, as suits model instances, so a body
    that is not an object would slip through: `"x"` as a conversation's body made a
    conversation titled "X" (str.title). Forbidding extra fields makes pydantic check
    the raw value first, and it catches a misspelt field instead of ignoring it."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetailOut(Schema):
    code: str
    message: str
    details: Any = None


class ErrorOut(Schema):
    """Every error of the API: a stable machine `code` and a human `message`."""

    error: ErrorDetailOut


# What any authenticated operation may answer: no or a bad credential, a key without
# the scope, a request that does not parse, the account's rate limit.
_ALWAYS = (401, 403, 422, 429)


def error_responses(*statuses: int) -> dict[int, type[ErrorOut]]:
    """`response=` entries for the error statuses an operation returns besides
    `_ALWAYS`, so its OpenAPI schema lists every status it can answer with."""
    return {status: ErrorOut for status in sorted({*_ALWAYS, *statuses})}
