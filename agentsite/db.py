"""Database connections kept open only where the thread that holds them lives on.

On SQLite the settings keep connections open (CONN_MAX_AGE): opening one costs about
0.6 ms of CPU (Django registers its SQL functions and runs the PRAGMAs), and Channels'
`database_sync_to_async` opened and closed one around every call, a dozen and more per
chat turn. Runs and WebSockets do their database work on one long-lived thread, whose
connection now lives as long as the process. An HTTP request under ASGI does its own on
a thread that ends with the request, and Django would leave that thread's connection
open (it is not old yet) for the garbage collector to find: it is closed here, when the
response is finished.
"""

from typing import Any

from django.db import connections
from django.db.models import Field, Model


def request_connections_close(**_: Any) -> None:
    """Receiver of `request_finished`: close the finishing request's connections."""
    for connection in connections.all(initialized_only=True):
        # Not a transaction still open on this thread: the tests run each test in one,
        # and Django's test client sends `request_finished` too.
        if not connection.in_atomic_block:
            connection.close()


def db_value(model: type[Model], name: str, value: Any) -> Any:
    """`value` as the model's field `name` writes it (for hand-written SQL): rows read
    back exactly as if the ORM had written them, on PostgreSQL and SQLite alike."""
    field = model._meta.get_field(name)
    assert isinstance(field, Field)
    return field.get_db_prep_value(value, connections["default"])
