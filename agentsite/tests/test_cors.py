"""Only the configured origins may call the JSON API from a browser, and only the API."""

import pytest

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def allowed_origin(settings):
    settings.CORS_ALLOWED_ORIGINS = ["https://app.example.com"]


def preflight(client, path, origin):
    return client.options(path, HTTP_ORIGIN=origin, HTTP_ACCESS_CONTROL_REQUEST_METHOD="GET")


def test_an_allowed_origin_may_call_the_api(client):
    response = preflight(client, "/api/openapi.json", "https://app.example.com")
    assert response["Access-Control-Allow-Origin"] == "https://app.example.com"


def test_other_origins_get_no_cors_headers(client):
    response = preflight(client, "/api/openapi.json", "https://evil.example.com")
    assert "Access-Control-Allow-Origin" not in response


def test_pages_outside_the_api_are_never_shared(client):
    response = preflight(client, "/login/", "https://app.example.com")
    assert "Access-Control-Allow-Origin" not in response


def test_an_allowed_origin_may_call_the_openai_endpoint_and_read_its_run(client):
    response = client.options(
        "/openai/v1/chat/completions",
        HTTP_ORIGIN="https://app.example.com",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS="authorization, content-type",
    )
    assert response["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "authorization" in response["Access-Control-Allow-Headers"]
    answer = client.get("/openai/v1/models", HTTP_ORIGIN="https://app.example.com")
    assert answer.status_code == 401  # no key; still readable by the app
    assert answer["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "X-Agentsite-Run" in answer["Access-Control-Expose-Headers"]
