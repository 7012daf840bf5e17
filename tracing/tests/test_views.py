import re
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from chat.models import Conversation, Run
from tracing.models import Span, Trace

pytestmark = pytest.mark.django_db

T0 = timezone.make_aware(datetime(2025, 3, 14, 9, 26, 53))
HOSTILE = "<img src=x onerror=alert(1)>"


def make_trace(
    user,
    *,
    status="ok",
    model="offline",
    started_at=T0,
    duration_ms=1200.0,
    cost_usd=None,
    **fields,
):
    conversation = Conversation.objects.create(owner=user)
    run = Run.objects.create(conversation=conversation, model=model)
    return Trace.objects.create(
        run=run,
        user=user,
        status=status,
        model=model,
        started_at=started_at,
        ended_at=started_at + timedelta(milliseconds=duration_ms),
        duration_ms=duration_ms,
        cost_usd=cost_usd,
        **fields,
    )


def add_span(
    trace, *, parent=None, kind="node", name="agent", start_ms=0.0, duration_ms=10.0, **fields
):
    started_at = trace.started_at + timedelta(milliseconds=start_ms)
    return Span.objects.create(
        trace=trace,
        parent=parent,
        kind=kind,
        name=name,
        started_at=started_at,
        ended_at=started_at + timedelta(milliseconds=duration_ms),
        duration_ms=duration_ms,
        **fields,
    )


def make_span_tree(trace, count):
    """A realistic shape: run → nodes (agent/tools) → llm and tool calls, `count` spans."""
    run = Span(
        trace=trace,
        kind="run",
        name="run",
        started_at=trace.started_at,
        ended_at=trace.started_at + timedelta(milliseconds=count * 10),
        duration_ms=count * 10.0,
    )
    spans, parent, at = [run], run, 0.0
    while len(spans) < count:
        node = Span(
            trace=trace,
            parent=run,
            kind="node",
            name="agent",
            started_at=trace.started_at + timedelta(milliseconds=at),
            ended_at=trace.started_at + timedelta(milliseconds=at + 20),
            duration_ms=20,
        )
        spans.append(node)
        parent = node
        if len(spans) < count:
            spans.append(
                Span(
                    trace=trace,
                    parent=parent,
                    kind="llm",
                    name="chat offline",
                    started_at=node.started_at,
                    ended_at=node.ended_at,
                    duration_ms=15,
                    attributes={"messages": [{"role": "user"}]},
                )
            )
        at += 20
    Span.objects.bulk_create(spans)
    return spans


def trace_links(content: str) -> int:
    return len(re.findall(r'href="/traces/[0-9a-f-]{36}/"', content))


def row_count(content: bytes) -> int:
    return len(re.findall(rb'class="span-row ', content))


def span_url(span) -> str:
    return reverse("tracing:span", args=[span.trace_id, span.id])


# --- the list ---------------------------------------------------------------------------


def test_pages_need_a_login(client):
    assert client.get(reverse("tracing:list")).status_code == 302


def test_list_shows_own_traces_only(client, make_user):
    alice, bob = make_user("alice"), make_user("bob")
    mine = make_trace(alice, model="gpt-mine")
    theirs = make_trace(bob, model="gpt-theirs")
    client.force_login(alice)
    content = client.get(reverse("tracing:list")).content.decode()
    assert reverse("tracing:detail", args=[mine.run_id]) in content
    assert reverse("tracing:detail", args=[theirs.run_id]) not in content
    assert "gpt-theirs" not in content
    assert "<th>User</th>" not in content


def test_staff_sees_everyones_traces_with_a_user_column(client, make_user):
    alice, bob = make_user("alice"), make_user("bob")
    bob.is_staff = True
    bob.save(update_fields=["is_staff"])
    alices = make_trace(alice)
    client.force_login(bob)
    content = client.get(reverse("tracing:list")).content.decode()
    assert reverse("tracing:detail", args=[alices.run_id]) in content
    assert "<th>User</th>" in content and "<td>alice</td>" in content


def test_list_shows_the_columns(client, make_user):
    alice = make_user()
    make_trace(
        alice,
        status="error",
        model="claude-x",
        duration_ms=2500,
        input_tokens=1000,
        output_tokens=234,
        cost_usd=Decimal("0.0421"),
    )
    client.force_login(alice)
    content = client.get(reverse("tracing:list")).content.decode()
    for text in ("Error", "claude-x", "2025-03-14", "2.50 s", "1,234", "$0.0421"):
        assert text in content


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"status": "error"}, {"failed"}),
        ({"model": "big-model"}, {"big"}),
        ({"started_after": "2025-03-15"}, {"later"}),
        ({"started_before": "2025-03-14"}, {"failed", "big", "cheap"}),
        (
            {"started_after": "2025-03-14", "started_before": "2025-03-14"},
            {"failed", "big", "cheap"},
        ),
        ({"min_duration": "5"}, {"big"}),
        ({"min_cost": "0.5"}, {"later"}),
        ({"status": "ok", "min_cost": "0.001"}, {"cheap", "later"}),
    ],
)
def test_filters(client, make_user, query, expected):
    alice = make_user()
    traces = {
        "failed": make_trace(alice, status="error", started_at=T0),
        "big": make_trace(alice, model="big-model", duration_ms=9000, started_at=T0),
        "cheap": make_trace(alice, cost_usd=Decimal("0.002"), started_at=T0),
        "later": make_trace(alice, cost_usd=Decimal("1.5"), started_at=T0 + timedelta(days=2)),
    }
    client.force_login(alice)
    content = client.get(reverse("tracing:list"), query).content.decode()
    shown = {
        name
        for name, trace in traces.items()
        if reverse("tracing:detail", args=[trace.run_id]) in content
    }
    assert shown == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"status": "exploded"}, "Select a valid choice"),
        ({"started_after": "yesterday-ish"}, "Enter a valid date"),
        ({"min_duration": "-3"}, "greater than or equal to 0"),
        ({"min_cost": "a lot"}, "Enter a number"),
        ({"started_after": "2025-03-15", "started_before": "2025-03-14"}, "must not be after"),
    ],
)
def test_bad_filter_input_shows_an_error(client, make_user, query, message):
    alice = make_user()
    trace = make_trace(alice)
    client.force_login(alice)
    response = client.get(reverse("tracing:list"), query)
    assert response.status_code == 200
    content = response.content.decode()
    assert message in content and 'class="filter-errors"' in content
    assert reverse("tracing:detail", args=[trace.run_id]) not in content


def test_pagination_keeps_the_filters(client, make_user):
    alice = make_user()
    for index in range(120):
        make_trace(alice, model="m", started_at=T0 + timedelta(minutes=index))
    make_trace(alice, model="other")
    client.force_login(alice)

    first = client.get(reverse("tracing:list"), {"model": "m"}).content.decode()
    assert trace_links(first) == 50
    assert "Page 1 of 3" in first and "120 traces" in first
    assert 'href="?model=m&amp;page=2"' in first

    last = client.get(reverse("tracing:list"), {"model": "m", "page": "3"}).content.decode()
    assert trace_links(last) == 20
    # Out-of-range and junk page numbers fall back to a real page, not an error.
    assert client.get(reverse("tracing:list"), {"page": "99"}).status_code == 200
    assert client.get(reverse("tracing:list"), {"page": "x"}).status_code == 200


# --- one trace --------------------------------------------------------------------------


def make_small_trace(user):
    trace = make_trace(user, duration_ms=1000)
    root = add_span(trace, kind="run", name="run", duration_ms=1000)
    node = add_span(trace, parent=root, kind="node", name="agent", start_ms=100, duration_ms=500)
    llm = add_span(
        trace,
        parent=node,
        kind="llm",
        name="chat gpt-x",
        start_ms=100,
        duration_ms=400,
        input_tokens=120,
        output_tokens=30,
        cost_usd=Decimal("0.00123"),
        attributes={
            "model": "gpt-x",
            "prompt": [{"role": "user", "content": "Hi <b>"}],
            "completion": "Hello there",
            "finish_reason": "stop",
        },
    )
    tool = add_span(
        trace,
        parent=root,
        kind="tool",
        name="calculator",
        start_ms=600,
        duration_ms=250,
        status="error",
        error_type="ZeroDivisionError",
        error_message="division by zero",
        attributes={"arguments": {"expression": "1/0"}},
    )
    return trace, llm, tool


def test_trace_page_renders_tree_and_waterfall(client, make_user):
    alice = make_user()
    trace, _, _ = make_small_trace(alice)
    client.force_login(alice)

    response = client.get(reverse("tracing:detail", args=[trace.run_id]))
    assert response.status_code == 200
    content = response.content.decode()
    assert row_count(response.content) == 4
    # Depth-first order, indented by depth.
    names = re.findall(r'<span class="span-name" title="[^"]*">([^<]*)</span>', content)
    assert names == ["run", "agent", "chat gpt-x", "calculator"]
    assert re.findall(r'data-depth="(\d+)"', content) == ["0", "1", "2", "1"]
    # Waterfall bars: start and width as a share of the trace's duration.
    assert 'style="left:10.000%;width:50.000%"' in content
    assert 'style="left:60.000%;width:25.000%"' in content
    # The panel is filled on selection, from the span view the page names.
    url = reverse("tracing:span", args=[trace.run_id, "00000000-0000-0000-0000-000000000000"])
    assert f'data-span-url="{url}"' in content


def test_trace_page_carries_no_span_payloads(client, make_user):
    alice = make_user()
    trace, _, _ = make_small_trace(alice)
    client.force_login(alice)
    content = client.get(reverse("tracing:detail", args=[trace.run_id])).content.decode()
    for payload in ("Hi &lt;b&gt;", "Hello there", "finish_reason", "1/0", "division by zero"):
        assert payload not in content
    assert 'class="span-detail"' not in content


def test_span_detail_shows_inputs_outputs_tokens_cost_and_error(client, make_user):
    alice = make_user()
    _, llm, tool = make_small_trace(alice)
    client.force_login(alice)

    response = client.get(span_url(llm))
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    content = response.content.decode()
    # A fragment for the panel, not a page.
    assert "<html" not in content and "<body" not in content
    assert f'id="detail-{llm.id}"' in content
    assert "── user ──\nHi &lt;b&gt;" in content
    assert "Hello there" in content and "finish_reason" in content
    assert "120 in · 30 out · 0 cached" in content and "$0.00123" in content
    assert "+100 ms" in content and "400 ms" in content

    content = client.get(span_url(tool)).content.decode()
    assert "ZeroDivisionError" in content and "division by zero" in content
    assert "&quot;expression&quot;: &quot;1/0&quot;" in content


def test_span_detail_of_another_users_trace_is_not_found(client, make_user):
    alice, mallory = make_user("alice"), make_user("mallory")
    _, llm, _ = make_small_trace(alice)
    client.force_login(mallory)
    response = client.get(span_url(llm))
    assert response.status_code == 404
    assert b"Hello there" not in response.content
    # Nor can a span be reached through a trace the user may see.
    own_trace, _, _ = make_small_trace(mallory)
    response = client.get(reverse("tracing:span", args=[own_trace.run_id, llm.id]))
    assert response.status_code == 404
    client.logout()
    assert client.get(span_url(llm)).status_code == 302


def test_staff_can_open_anyones_span_detail(client, make_user):
    alice, admin = make_user("alice"), make_user("admin")
    admin.is_staff = True
    admin.save(update_fields=["is_staff"])
    _, llm, _ = make_small_trace(alice)
    client.force_login(admin)
    response = client.get(span_url(llm))
    assert response.status_code == 200 and b"Hello there" in response.content


def test_hostile_content_is_escaped(client, make_user):
    alice = make_user()
    trace = make_trace(alice, model=HOSTILE, error_type=HOSTILE, error_message=HOSTILE)
    root = add_span(trace, kind="run", name=HOSTILE)
    tool = add_span(
        trace,
        parent=root,
        kind="tool",
        name=HOSTILE,
        status="error",
        error_type=HOSTILE,
        error_message=HOSTILE,
        attributes={
            "arguments": {"q": HOSTILE},
            "result": HOSTILE,
            HOSTILE: HOSTILE,
            "long": [HOSTILE] * 3,
        },
    )
    client.force_login(alice)
    for url in (
        reverse("tracing:detail", args=[trace.run_id]),
        reverse("tracing:list"),
        span_url(tool),
    ):
        content = client.get(url).content.decode()
        assert "<img" not in content
        assert "&lt;img src=x onerror=alert(1)&gt;" in content
    # Every place the detail fragment shows the hostile text (name, error, arguments,
    # result, an attribute's key and value, a long list) has it escaped.
    fragment = client.get(span_url(tool)).content.decode()
    assert fragment.count("&lt;img src=x onerror=alert(1)&gt;") >= 8


def test_another_users_trace_is_not_found(client, make_user):
    alice, mallory = make_user("alice"), make_user("mallory")
    trace = make_trace(alice)
    add_span(trace, kind="run", name="secret-run")
    client.force_login(mallory)
    response = client.get(reverse("tracing:detail", args=[trace.run_id]))
    assert response.status_code == 404
    assert b"secret-run" not in response.content
    missing = "00000000-0000-0000-0000-000000000000"
    assert client.get(reverse("tracing:detail", args=[missing])).status_code == 404


def test_staff_can_open_anyones_trace_but_not_their_conversation_link(client, make_user):
    alice, admin = make_user("alice"), make_user("admin")
    admin.is_staff = True
    admin.save(update_fields=["is_staff"])
    trace = make_trace(alice)
    add_span(trace, kind="run", name="run")
    client.force_login(admin)
    response = client.get(reverse("tracing:detail", args=[trace.run_id]))
    assert response.status_code == 200
    assert b"Open conversation" not in response.content
    client.force_login(alice)
    response = client.get(reverse("tracing:detail", args=[trace.run_id]))
    assert b"Open conversation" in response.content


def test_a_running_trace_without_duration_renders(client, make_user):
    alice = make_user()
    trace = make_trace(alice, status="running", duration_ms=0)
    Trace.objects.filter(pk=trace.pk).update(duration_ms=None, ended_at=None)
    add_span(trace, kind="run", name="run", duration_ms=0)
    client.force_login(alice)
    response = client.get(reverse("tracing:detail", args=[trace.run_id]))
    assert response.status_code == 200 and row_count(response.content) == 1


def test_a_thousand_span_trace_renders(client, make_user, django_assert_max_num_queries):
    alice = make_user()
    trace = make_trace(alice, duration_ms=10_000)
    make_span_tree(trace, 1000)
    client.force_login(alice)
    # Session, user, the trace with its run (for the conversation link), and the spans
    # in one query, however many there are.
    with django_assert_max_num_queries(4):
        response = client.get(reverse("tracing:detail", args=[trace.run_id]))
    assert response.status_code == 200
    assert row_count(response.content) == 1000
    assert len(set(re.findall(rb'data-span="([0-9a-f-]{36})"', response.content))) == 1000
    assert b"messages" not in response.content


def test_a_span_starting_before_its_trace_stretches_the_timeline(client, make_user):
    # Clock skew between processes: bars must stay inside the waterfall, not pile up at 0.
    alice = make_user()
    trace = make_trace(alice, duration_ms=1000)
    root = add_span(trace, kind="run", name="run", start_ms=-100, duration_ms=1100)
    add_span(trace, parent=root, kind="llm", name="llm", start_ms=0, duration_ms=550)
    client.force_login(alice)
    content = client.get(reverse("tracing:detail", args=[trace.run_id])).content.decode()
    assert 'style="left:0.000%;width:100.000%"' in content
    assert 'style="left:9.091%;width:50.000%"' in content
    assert "−100 ms" in content


# --- a trace link followed before its trace is written -------------------------------


def make_run(user, *, status="completed", finished_ago=timedelta(seconds=1)):
    conversation = Conversation.objects.create(owner=user)
    return Run.objects.create(
        conversation=conversation,
        model="offline",
        status=status,
        finished_at=timezone.now() - finished_ago if finished_ago is not None else None,
    )


def test_a_just_finished_run_without_trace_says_it_is_being_written(client, make_user):
    alice = make_user()
    run = make_run(alice)
    client.force_login(alice)
    response = client.get(reverse("tracing:detail", args=[run.id]))
    assert response.status_code == 200
    content = response.content.decode()
    assert "This run's trace is being written — it will appear in a moment" in content
    assert re.search(r'<meta http-equiv="refresh" content="[12]">', content)


def test_a_running_run_without_trace_says_it_is_being_written(client, make_user):
    alice = make_user()
    run = make_run(alice, status="running", finished_ago=None)
    client.force_login(alice)
    response = client.get(reverse("tracing:detail", args=[run.id]))
    assert response.status_code == 200 and b"being written" in response.content


def test_the_trace_replaces_the_waiting_page_once_written(client, make_user):
    alice = make_user()
    trace = make_trace(alice)
    add_span(trace, kind="run", name="run")
    client.force_login(alice)
    content = client.get(reverse("tracing:detail", args=[trace.run_id])).content
    assert b"being written" not in content and b'http-equiv="refresh"' not in content
    assert row_count(content) == 1


@override_settings(TRACING_ENABLED=False)
def test_a_run_without_trace_says_tracing_is_off(client, make_user):
    alice = make_user()
    run = make_run(alice)
    client.force_login(alice)
    response = client.get(reverse("tracing:detail", args=[run.id]))
    assert response.status_code == 200
    assert b"Tracing is turned off" in response.content
    assert b'http-equiv="refresh"' not in response.content


def test_a_long_finished_run_without_trace_does_not_wait_forever(client, make_user):
    alice = make_user()
    run = make_run(alice, finished_ago=timedelta(hours=1))
    client.force_login(alice)
    response = client.get(reverse("tracing:detail", args=[run.id]))
    assert response.status_code == 404
    assert b"No trace was recorded for this run" in response.content
    assert b'http-equiv="refresh"' not in response.content


def test_another_users_run_without_trace_is_not_found(client, make_user):
    alice, mallory = make_user("alice"), make_user("mallory")
    run = make_run(alice)
    client.force_login(mallory)
    response = client.get(reverse("tracing:detail", args=[run.id]))
    assert response.status_code == 404
    assert b"being written" not in response.content
