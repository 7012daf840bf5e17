import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from chat import services as chat_services
from chat.models import Run
from tracing import services
from tracing.models import Span, Trace

pytestmark = pytest.mark.django_db


def make_trace(user, *, days_ago=0, spans=3):
    conversation = chat_services.conversation_create(owner=user)
    run = Run.objects.create(conversation=conversation, model="m")
    started = timezone.now() - timedelta(days=days_ago)
    trace = services.trace_start(run_id=run.id, user_id=user.id, model="m", started_at=started)
    root = Span.objects.create(
        trace=trace,
        kind="run",
        name="run",
        started_at=started,
        ended_at=started + timedelta(seconds=1),
        duration_ms=1000,
    )
    node = Span.objects.create(
        trace=trace,
        parent=root,
        kind="node",
        name="call_model",
        started_at=started + timedelta(milliseconds=10),
        ended_at=started + timedelta(milliseconds=900),
        duration_ms=890,
    )
    for i in range(spans - 2):
        Span.objects.create(
            trace=trace,
            parent=node,
            kind="llm",
            name=f"<b>llm{i}</b>",
            started_at=started + timedelta(milliseconds=20 + i),
            ended_at=started + timedelta(milliseconds=800),
            duration_ms=780,
            attributes={"prompt": [{"role": "user", "content": "<script>x</script>"}]},
        )
    return trace


def client_for(user):
    client = Client()
    client.force_login(user)
    return client


def test_the_trace_endpoint_returns_the_nested_tree(make_user):
    alice = make_user("alice")
    trace = make_trace(alice, spans=4)
    response = client_for(alice).get(f"/api/v1/runs/{trace.run_id}/trace")
    assert response.status_code == 200
    body = response.json()
    assert body["run_id"] == str(trace.run_id) and body["status"] == "running"
    [root] = body["spans"]
    assert root["kind"] == "run" and root["offset_ms"] == 0
    [node] = root["children"]
    assert node["name"] == "call_model" and node["offset_ms"] == pytest.approx(10)
    assert [c["name"] for c in node["children"]] == ["<b>llm0</b>", "<b>llm1</b>"]
    assert node["children"][0]["attributes"]["prompt"][0]["content"] == "<script>x</script>"


def test_another_users_trace_is_not_found(make_user):
    alice, mallory = make_user("alice"), make_user("mallory")
    trace = make_trace(alice)
    response = client_for(mallory).get(f"/api/v1/runs/{trace.run_id}/trace")
    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "There is no such trace.", "details": None}
    }
    missing = client_for(mallory).get(f"/api/v1/runs/{uuid.uuid4()}/trace")
    assert missing.status_code == 404 and missing.json() == response.json()


def test_staff_browse_everyones_traces_in_the_pages_but_not_through_the_api(make_user):
    from tracing.selectors import trace_absence, trace_get

    alice, staff = make_user("alice"), make_user("staff")
    staff.is_staff = True
    staff.save()
    trace = make_trace(alice)
    assert trace_get(user=staff, run_id=trace.run_id) == trace
    assert trace_absence(user=staff, run_id=trace.run_id).conversation_id is None
    response = client_for(staff).get(f"/api/v1/runs/{trace.run_id}/trace")
    assert response.status_code == 404


def test_the_api_wants_a_signed_in_user_and_valid_ids(make_user):
    trace = make_trace(make_user("alice"))
    anonymous = Client().get(f"/api/v1/runs/{trace.run_id}/trace")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthenticated"
    invalid = client_for(make_user("bob")).get("/api/v1/runs/not-a-uuid/trace")
    assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_request"


def test_the_api_documents_itself():
    assert Client().get("/api/openapi.json").json()["info"]["title"] == "Agentsite API"
    assert Client().get("/api/docs").status_code == 200


def test_deleting_a_trace_deletes_its_spans_without_loading_them(make_user):
    alice = make_user("alice")
    trace, other = make_trace(alice, spans=50), make_trace(alice)
    with CaptureQueriesContext(connection) as queries:
        Trace.objects.filter(pk=trace.pk).delete()
    assert not Span.objects.filter(trace_id=trace.pk).exists()
    assert Span.objects.filter(trace_id=other.pk).count() == 3
    span_queries = [q["sql"] for q in queries if "tracing_span" in q["sql"]]
    assert len(span_queries) == 1 and span_queries[0].startswith("DELETE")


def test_trace_list_filters_and_staff_sees_everyone(make_user):
    from tracing.selectors import trace_list

    alice, bob = make_user("alice"), make_user("bob")
    make_trace(alice)
    make_trace(bob, days_ago=2)
    assert trace_list(user=alice).count() == 1
    staff = make_user("staff")
    staff.is_staff = True
    staff.save()
    assert trace_list(user=staff).count() == 2
    assert trace_list(user=staff, started_after=timezone.now() - timedelta(days=1)).count() == 1
    assert trace_list(user=staff, status="ok").count() == 0
