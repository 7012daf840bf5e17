"""What a model or a tool produced is stored on PostgreSQL even when it carries a NUL
or a lone surrogate (text and JSONB columns refuse both): the run's messages, its tool
records, its error and its trace, on a database of its own."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, _server_env
from tests.servers import postgres_available, postgres_database

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not postgres_available(),
        reason="PostgreSQL is NOT reachable on 127.0.0.1:5432: NUL storage is untested",
    ),
]

SCRIPT = r"""
import time
import uuid
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import transaction
from chat import lifecycle, services
from chat.models import Message, Run
from chat.run_outcome import RunOutcome, TextStreamed, ToolFinished, ToolStarted
from tracing import services as tracing_services
from tracing.capture import TOOL, RunTracer, SpanRecord, _dt
from tracing.models import Span, Trace

call_command("migrate", interactive=False, verbosity=0)
user = get_user_model().objects.create_user("nul")
conversation = services.conversation_create(owner=user)
run = Run.objects.create(conversation=conversation, model="m", status=Run.Status.RUNNING)

outcome = RunOutcome(status=Run.Status.FAILED, error_code="x", error_message="bad\x00end")
outcome.record(TextStreamed("before\x00after \ud800"))
outcome.record(ToolStarted(tool_call_id="c1", name="calculator", args={"expression": "1\x00+1"}))
outcome.record(
    ToolFinished(tool_call_id="c1", name="calculator", result="out\x00put", is_error=True)
)
with transaction.atomic():
    locked = lifecycle.run_lock(run_id=run.id)
    assert lifecycle.run_finish(locked=locked, outcome=outcome, final_seq=5) is not None
answer = Message.objects.get(run=run, role=Message.Role.ASSISTANT)
tool = Message.objects.get(run=run, role=Message.Role.TOOL).tool
error = Run.objects.get(id=run.id).error_message
print(repr((answer.content, tool["args"], tool["result"], error)))

tracer = RunTracer(run_id=run.id, user_id=user.pk)
now = time.time()
record = SpanRecord(uuid.uuid4(), run.id, TOOL, "calculator", now, {"expression": "1\x00+1"})
record.end, record.output, record.error = now, "out\x00put", ("tool_error", "no\x00pe")
tracing_services.trace_finish(
    create=True, run_id=run.id, user_id=user.pk, started_at=_dt(now), ended_at=_dt(now),
    spans=[row := tracer._row(record)], all_spans=[row], status="error", duration_ms=0,
)
span = Span.objects.get(trace_id=run.id)
print(repr((span.attributes["arguments"], span.attributes["result"], span.error_message)))
"""


def test_model_and_tool_output_with_a_nul_is_stored(tmp_path: Path) -> None:
    with postgres_database("agentsite_text") as database_url:
        env = {**_server_env(tmp_path), "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"}
        done = subprocess.run(
            [sys.executable, "manage.py", "shell", "--no-imports", "-c", SCRIPT],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    messages, span = done.stdout.strip().splitlines()[-2:]
    # Kept, with the gap shown as U+FFFD.
    assert messages == repr(
        ("before\ufffdafter \ufffd", {"expression": "1\ufffd+1"}, "out\ufffdput", "bad\ufffdend")
    )
    assert span == repr(({"expression": "1\ufffd+1"}, "out\ufffdput", "no\ufffdpe"))
