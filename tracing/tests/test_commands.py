import pytest
from django.core.management import call_command

from tracing.models import Span, Trace
from tracing.tests.test_api import make_trace

pytestmark = pytest.mark.django_db


def test_prune_traces_deletes_old_traces_and_their_spans(make_user, capsys):
    alice = make_user("alice")
    old = [make_trace(alice, days_ago=40) for _ in range(3)]
    recent = make_trace(alice, days_ago=5)
    call_command("prune_traces")
    assert "Deleted 3 trace(s) older than 30 day(s)." in capsys.readouterr().out
    assert list(Trace.objects.all()) == [recent]
    assert not Span.objects.filter(trace_id__in=[t.run_id for t in old]).exists()
    call_command("prune_traces", "--days", "1")
    assert not Trace.objects.exists() and not Span.objects.exists()
