"""How a run's ending reads in the Chat Completions format (chat.openai_compat.wire);
the endpoint itself is driven by the openai SDK in tests/test_openai_api.py."""

from typing import Any

import pytest

from chat.openai_compat import wire


def final(status: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": f"run.{status}",
        "status": status,
        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        **extra,
    }


def test_an_answer_cut_at_a_limit_ends_with_length() -> None:
    assert wire.finish_reason_of(final("completed")) == "stop"
    assert wire.finish_reason_of(final("limit_reached")) == "length"


@pytest.mark.parametrize(
    ("status", "code", "http_status"),
    [
        ("failed", "provider_timeout", 502),
        ("failed", "internal_error", 500),
        ("cancelled", "cancelled", 409),
        ("interrupted", "run_interrupted", 503),
    ],
)
def test_a_run_that_did_not_answer_is_an_error_not_retried(
    status: str, code: str, http_status: int
) -> None:
    error = wire.run_error(final(status, error={"code": code, "message": "It went wrong."}))
    assert (error.status, error.code, error.message) == (http_status, code, "It went wrong.")
    assert error.headers == wire.NO_RETRY


@pytest.mark.parametrize(
    ("left", "longest"),
    [({"exhausted_today": True}, 86_401), ({"exhausted_month": True}, 31 * 86_400 + 1)],
)
def test_over_budget_is_429_until_the_budget_period_starts_again(
    left: dict[str, bool], longest: int
) -> None:
    ending = final(
        "budget_exceeded",
        error={"code": "budget_exceeded", "message": "No more."},
        budget={"left": left},
    )
    error = wire.run_error(ending)
    assert (error.status, error.type, error.code) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert 1 <= int(error.headers["Retry-After"]) <= longest
    assert error.headers["x-should-retry"] == "false"
    # A limit per run: no period to wait for.
    assert "Retry-After" not in wire.run_error(final("budget_exceeded", budget=None)).headers


def test_usage_is_every_model_call_of_the_run() -> None:
    assert wire.usage_of(final("completed")) == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }
