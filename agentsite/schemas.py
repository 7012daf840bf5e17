"""Schemas every router of the JSON API shares.

Interim: the auth work (agentsite/auth.py) brings the project's error schema and the
helper that declares an operation's error statuses; these give way to them."""

from typing import Any

from ninja import Schema


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
