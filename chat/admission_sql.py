"""Two statements `services.run_create` runs on every message, written as SQL.

Why not the ORM here, as for `billing.budget_sql`: the count of the runs under way was
the dearest statement of a run's admission, 2 % of the server's CPU under load on
PostgreSQL, most of it Python compiling an aggregate over three joined models; and the
conversation's update is one statement here with what it wrote (its title, which the
run's first event shows), where the ORM needs a second to read it back. The SQL runs
unchanged on PostgreSQL and SQLite (RETURNING needs SQLite ≥ 3.35), every value adapted
by its model field.
"""

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from django.db.backends.utils import CursorWrapper

from agentsite.db import db_value
from billing.models import Membership

from .models import Conversation, Run

CONVERSATION = Conversation._meta.db_table
RUN = Run._meta.db_table
MEMBERSHIP = Membership._meta.db_table


_TOUCH = f"""
UPDATE {CONVERSATION}
SET title = CASE WHEN title = %(placeholder)s THEN %(title)s ELSE title END,
  updated_at = %(now)s
WHERE id = %(id)s
RETURNING title
"""


def conversation_touch(
    cursor: CursorWrapper, *, conversation_id: UUID, placeholder: str, title: str, now: datetime
) -> str | None:
    """Mark the conversation updated, titled `title` if it still has the `placeholder`
    (which locks its row until the transaction ends); its title now, or None if it is
    gone."""
    cursor.execute(
        _TOUCH,
        {
            "placeholder": placeholder,
            "title": title,
            "now": db_value(Conversation, "updated_at", now),
            "id": db_value(Conversation, "id", conversation_id),
        },
    )
    row = cursor.fetchone()
    return None if row is None else row[0]


@dataclass(frozen=True)
class RunsUnderWay:
    alive: int  # the account's, held against its limit
    alive_here: int  # the conversation's, alive
    lost_here: int  # the conversation's, whose process died


# The account's runs are those of conversations its members own. Alive: a process holds
# the lease, or a queue holds the run (no lease); see `chat.models.lease_held`.
_UNDER_WAY = f"""
SELECT
  COUNT(CASE WHEN r.lease_expires_at IS NULL OR r.lease_expires_at >= %(now)s THEN 1 END),
  COUNT(CASE WHEN r.conversation_id = %(here)s
    AND (r.lease_expires_at IS NULL OR r.lease_expires_at >= %(now)s) THEN 1 END),
  COUNT(CASE WHEN r.conversation_id = %(here)s AND r.lease_expires_at < %(now)s THEN 1 END)
FROM {RUN} r
  JOIN {CONVERSATION} c ON c.id = r.conversation_id
  JOIN {MEMBERSHIP} m ON m.user_id = c.owner_id
WHERE m.account_id = %(account)s
  AND r.status IN ({", ".join(f"'{status}'" for status in Run.ACTIVE_STATUSES)})
"""


def runs_under_way(
    cursor: CursorWrapper, *, account_id: int, conversation_id: UUID, now: datetime
) -> RunsUnderWay:
    """The account's active runs (leases judged at `now`), counted in one query."""
    cursor.execute(
        _UNDER_WAY,
        {
            "now": db_value(Run, "lease_expires_at", now),
            "here": db_value(Run, "conversation", conversation_id),
            "account": account_id,
        },
    )
    alive, alive_here, lost_here = cursor.fetchone()
    return RunsUnderWay(alive=alive, alive_here=alive_here, lost_here=lost_here)
