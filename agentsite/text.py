"""Text as every database here can store it."""

import re
from typing import Any

# Characters no database here can store: PostgreSQL text and JSONB refuse NUL, and no
# UTF-8 database takes a lone surrogate (JSON can carry one escaped, as "\ud800").
UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")

REPLACEMENT = "\ufffd"


def text_storable(value: Any) -> Any:
    """`value` (a string, or JSON-like lists and dicts of them) with every unstorable
    character replaced by U+FFFD, for what a model or a tool produced: it is kept, and
    the gap shows, where a person's input would be refused instead."""
    if isinstance(value, str):
        return UNSTORABLE.sub(REPLACEMENT, value)
    if isinstance(value, dict):
        return {text_storable(k): text_storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [text_storable(v) for v in value]
    return value
