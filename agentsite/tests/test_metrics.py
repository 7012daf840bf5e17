"""The Prometheus metrics. The registry lives as long as the process, so every check is
a change measured across what the test does, never a value or a name that some earlier
test may already have put there."""

from decimal import Decimal

import pytest
from channels.db import database_sync_to_async
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from billing.models import ModelPrice
from chat import services
from chat.metrics import tool_call_observe
from chat.models import Run
from conftest import cancelled_mid_answer, open_socket, receive_until, wait_for_runs
from tracing.tests.test_capture import run_message

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "agentsite-offline-demo"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def samples() -> dict[str, float]:
    return {
        "runs": sample("agentsite_runs_total", status="completed"),
        "run_durations": sample("agentsite_run_duration_seconds_count"),
        "llm_calls": sample("agentsite_llm_call_duration_seconds_count", model=MODEL),
        "input_tokens": sample("agentsite_llm_tokens_total", direction="input", model=MODEL),
        "output_tokens": sample("agentsite_llm_tokens_total", direction="output", model=MODEL),
        "active_runs": sample("agentsite_active_runs"),
        "open_websockets": sample("agentsite_open_websockets"),
        "calculator_ok": sample("agentsite_tool_calls_total", tool="calculator", outcome="ok"),
        "cost_usd": sample("agentsite_llm_cost_usd_total", model=MODEL),
    }


async def test_a_run_counts_its_run_llm_calls_tokens_tools_cost_and_socket(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.01  # so the run is caught while it is going
    await ModelPrice.objects.aupdate_or_create(
        model=MODEL,
        defaults={"input_per_mtok": Decimal("2"), "output_per_mtok": Decimal("8")},
    )
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    before = samples()

    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    await socket.send_json_to({"type": "message", "content": "What is 2*3?"})
    await receive_until(socket, "token")
    during = samples()
    await receive_until(socket, "run.completed")
    await socket.disconnect()
    await wait_for_runs()
    after = samples()

    run = await Run.objects.aget(conversation=conversation)
    llm_calls = 2  # one asks for the calculator, one answers
    assert during["open_websockets"] - before["open_websockets"] == 1
    assert during["active_runs"] - before["active_runs"] == 1
    assert run.cost_usd and run.cost_usd > 0
    assert after["cost_usd"] - before["cost_usd"] == pytest.approx(float(run.cost_usd))
    del before["cost_usd"], after["cost_usd"]
    assert {name: after[name] - before[name] for name in before} == {
        "runs": 1,
        "run_durations": 1,
        "llm_calls": llm_calls,
        "input_tokens": run.input_tokens,
        "output_tokens": run.output_tokens,
        "active_runs": 0,
        "open_websockets": 0,
        "calculator_ok": 1,
    }


async def test_run_errors_are_counted_by_code_and_tool_calls_by_outcome(make_user, settings):
    user = await database_sync_to_async(make_user)()
    refused = sample("agentsite_tool_calls_total", tool="calculator", outcome="error")
    await run_message(user, "What is 1/0?")
    assert sample("agentsite_tool_calls_total", tool="calculator", outcome="error") == refused + 1

    settings.AGENT_MODEL = "openai"
    settings.AGENT_OPENAI_BASE_URL = "http://127.0.0.1:9/v1"  # nothing listens there
    settings.AGENT_PROVIDER_MAX_RETRIES = 0
    unreachable = sample("agentsite_run_errors_total", code="provider_unreachable")
    failed = sample("agentsite_runs_total", status="failed")
    await run_message(user, "hello", until="run.failed")
    assert sample("agentsite_run_errors_total", code="provider_unreachable") == unreachable + 1
    assert sample("agentsite_runs_total", status="failed") == failed + 1


async def test_a_cancel_is_not_counted_as_an_error(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    cancelled = sample("agentsite_run_errors_total", code="cancelled")
    conversation = await cancelled_mid_answer(user)
    assert await Run.objects.filter(conversation=conversation, status="cancelled").aexists()
    assert sample("agentsite_run_errors_total", code="cancelled") == cancelled


def test_metrics_are_served_in_the_prometheus_format(client, db):
    response = client.get("/metrics")
    assert response.status_code == 200 and response["Content-Type"] == CONTENT_TYPE_LATEST
    served = {
        s.name: s.value
        for family in text_string_to_metric_families(response.content.decode())
        for s in family.samples
    }
    assert served["agentsite_active_runs"] == REGISTRY.get_sample_value("agentsite_active_runs")


def test_metrics_can_be_switched_off(client, settings, db):
    settings.METRICS_ENABLED = False
    assert client.get("/metrics").status_code == 404


def test_a_tool_name_the_model_made_up_is_counted_as_other():
    # A made-up name must not become a series of its own: names are unbounded.
    before = sample("agentsite_tool_calls_total", tool="other", outcome="error")
    tool_call_observe(tool="rm_rf_everything", is_error=True)
    assert sample("agentsite_tool_calls_total", tool="other", outcome="error") == before + 1
    assert (
        REGISTRY.get_sample_value(
            "agentsite_tool_calls_total", {"tool": "rm_rf_everything", "outcome": "error"}
        )
        is None
    )
