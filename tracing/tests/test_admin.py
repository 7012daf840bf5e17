import pytest

from tracing.tests.test_api import client_for, make_trace

pytestmark = pytest.mark.django_db


def test_the_admin_shows_the_tree_read_only_and_escaped(make_user):
    alice = make_user("alice")
    trace = make_trace(alice)
    admin = make_user("root")
    admin.is_staff = admin.is_superuser = True
    admin.save()
    client = client_for(admin)
    page = client.get(f"/admin/tracing/trace/{trace.run_id}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "call_model" in html and "&lt;b&gt;llm0&lt;/b&gt;" in html
    assert "<b>llm0</b>" not in html
    assert client.get("/admin/tracing/trace/add/").status_code == 403
    assert client.post(f"/admin/tracing/trace/{trace.run_id}/delete/").status_code == 403
