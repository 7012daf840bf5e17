"""Cursor pagination (agentsite.pagination): walking the pages yields every row once, in
order, whatever the ties, the page size, and the rows deleted or added on the way."""

import itertools
from datetime import timedelta

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentsite.errors import ApplicationError
from agentsite.pagination import PageParams, paginate
from chat.models import Conversation

pytestmark = pytest.mark.django_db

ORDER = ("-created_at", "-id")
# The examples of a test share its database: each makes a user of its own.
USERS = itertools.count()
EXAMPLES = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def walk(queryset, limit, *, between_pages=lambda page_number: None):
    seen, cursor = [], None
    # More pages than rows would mean pages repeating: fail rather than loop.
    for page_number in range(1, 100):
        page = paginate(
            queryset, ordering=ORDER, params=PageParams(cursor=cursor, limit=limit), salt="t"
        )
        assert len(page.items) <= limit
        seen += [row.id for row in page.items]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor
        between_pages(page_number)
    raise AssertionError(f"no last page: {len(seen)} rows seen")


def conversations(owner, seconds):
    """One conversation per entry, created that many seconds after an instant an hour ago
    (so a conversation made now is newer than all): equal entries are ties."""
    start = timezone.now() - timedelta(hours=1)
    made = [Conversation.objects.create(owner=owner) for _ in seconds]
    for conversation, offset in zip(made, seconds, strict=True):
        Conversation.objects.filter(id=conversation.id).update(
            created_at=start + timedelta(seconds=offset)
        )
    return Conversation.objects.filter(owner=owner)


@given(
    seconds=st.lists(st.integers(0, 3), max_size=25),  # few instants: many ties
    limit=st.integers(1, 8),
)
@EXAMPLES
def test_the_pages_hold_every_row_once_in_order(make_user, seconds, limit):
    owner = make_user(f"user{next(USERS)}")
    queryset = conversations(owner, seconds)
    expected = list(queryset.order_by(*ORDER).values_list("id", flat=True))
    assert walk(queryset, limit) == expected


@given(
    seconds=st.lists(st.integers(0, 3), min_size=4, max_size=20),
    limit=st.integers(1, 4),
    data=st.data(),
)
@EXAMPLES
def test_rows_deleted_or_added_between_pages_never_repeat_or_hide_the_others(
    make_user, seconds, limit, data
):
    owner = make_user(f"user{next(USERS)}")
    queryset = conversations(owner, seconds)
    before = list(queryset.order_by(*ORDER).values_list("id", flat=True))
    deleted = set()

    def churn(page_number):
        # A row anywhere is deleted, and a new one (newest of all) is added.
        remaining = list(
            queryset.exclude(id__in=deleted).order_by(*ORDER).values_list("id", flat=True)
        )
        if remaining:
            # Drawn by position: the ids are new in every run, the positions are not.
            victim = remaining[data.draw(st.integers(0, len(remaining) - 1))]
            Conversation.objects.filter(id=victim).delete()
            deleted.add(victim)
        Conversation.objects.create(owner=owner)

    seen = walk(queryset, limit, between_pages=churn)
    assert len(seen) == len(set(seen))
    # The new rows sort before the cursor: not seen. The others are seen in order, and
    # every one never deleted is seen.
    position = {row: index for index, row in enumerate(before)}
    assert set(seen) <= set(position)
    assert seen == sorted(seen, key=position.__getitem__)
    assert {row for row in before if row not in deleted} <= set(seen)


def test_a_cursor_is_refused_by_a_list_with_another_salt(make_user):
    queryset = conversations(make_user(), [0, 1, 2])
    cursor = paginate(queryset, ordering=ORDER, params=PageParams(cursor=None, limit=1), salt="a")
    with pytest.raises(ApplicationError) as refused:
        paginate(
            queryset,
            ordering=ORDER,
            params=PageParams(cursor=cursor.next_cursor, limit=1),
            salt="b",
        )
    assert refused.value.code == "invalid_cursor" and refused.value.http_status == 400
