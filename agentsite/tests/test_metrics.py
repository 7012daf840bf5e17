"""The Prometheus metrics. The registry lives as long as the process, so every check is
a change measured across what the test does, never a value or a name that some earlier
test may already have put there."""

import pytest
from channels.db import database_sync_to_async
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from chat import services
from chat.models import Run
from conftest import open_socket, receive_until, wait_for_runs

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
    }


async def test_a_run_counts_its_run_llm_calls_tokens_and_socket(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.01  # so the run is caught while it is going
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
    assert {name: after[name] - before[name] for name in before} == {
        "runs": 1,
        "run_durations": 1,
        "llm_calls": llm_calls,
        "input_tokens": run.input_tokens,
        "output_tokens": run.output_tokens,
        "active_runs": 0,
        "open_websockets": 0,
    }


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
