"""Provider failures, translated into the error codes a run ends with.

The OpenAI and Anthropic SDKs already retry transient failures (429, 5xx, timeouts,
dropped connections) with exponential backoff (`AGENT_PROVIDER_MAX_RETRIES`); what
reaches us here has exhausted those retries or is not worth retrying.
"""

import json

import anthropic
import openai
import pydantic


class ProviderError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _status_error(status: int, detail: str) -> ProviderError:
    if status in (401, 403):
        return ProviderError(
            "provider_auth",
            f"The model provider refused our credentials ({status}): check the API key. {detail}",
        )
    if status == 404:
        return ProviderError(
            "provider_model_not_found",
            f"The model provider does not know this model (404): check the model name. {detail}",
        )
    if status == 429:
        return ProviderError(
            "provider_rate_limited",
            "The model provider is rate limiting us (429) and retries did not help; "
            f"try again in a minute. {detail}",
        )
    if status >= 500:
        return ProviderError(
            "provider_unavailable",
            f"The model provider failed ({status}) and retries did not help. {detail}",
        )
    return ProviderError(
        "provider_bad_request", f"The model provider rejected the request ({status}). {detail}"
    )


def provider_error_from(error: BaseException) -> ProviderError | None:
    """Map an SDK exception to a ProviderError; None when it is not a provider failure."""
    if isinstance(error, ProviderError):
        return error
    if isinstance(error, openai.APITimeoutError | anthropic.APITimeoutError):
        return ProviderError(
            "provider_timeout",
            "The model provider did not answer in time (AGENT_PROVIDER_TIMEOUT).",
        )
    if isinstance(error, openai.APIConnectionError | anthropic.APIConnectionError):
        return ProviderError(
            "provider_unreachable",
            "Could not connect to the model provider: check its URL and that it is running.",
        )
    if isinstance(error, openai.APIStatusError | anthropic.APIStatusError):
        return _status_error(error.status_code, _detail(error))
    if isinstance(
        error,
        openai.APIResponseValidationError
        | anthropic.APIResponseValidationError
        | json.JSONDecodeError
        | pydantic.ValidationError,
    ):
        return ProviderError(
            "provider_bad_response", f"The model provider sent a malformed reply: {error}"
        )
    return None


def _detail(error: openai.APIStatusError | anthropic.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])[:300]
    return ""
