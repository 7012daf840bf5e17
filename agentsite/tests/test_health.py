import pytest
from django.test import AsyncClient

from tests.servers import REDIS_URL, redis_available

pytestmark = pytest.mark.django_db(transaction=True)


def test_healthz_answers_without_touching_anything(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_readyz_checks_the_database_and_channel_layer():
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "channel_layer": "ok"}


@pytest.mark.skipif(not redis_available(), reason="Redis is NOT reachable: readyz untested")
async def test_readyz_checks_redis_when_configured(settings):
    settings.REDIS_URL = REDIS_URL
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 200 and response.json()["checks"]["redis"] == "ok"


async def test_readyz_reports_an_unreachable_redis(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["checks"]["redis"].startswith("error")
