"""Schemas every router of the JSON API shares (its errors: `agentsite.api_errors`)."""

from ninja import Schema
from pydantic import ConfigDict


class BodyIn(Schema):
    """A request body: a JSON object of the declared fields only (422 otherwise).

    ninja's Schema reads its input by attribute, as suits model instances, so a body
    that is not an object would slip through: `"x"` as a conversation's body made a
    conversation titled "X" (str.title). Forbidding extra fields makes pydantic check
    the raw value first, and it catches a misspelt field instead of ignoring it."""

    model_config = ConfigDict(extra="forbid")
