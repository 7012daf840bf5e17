"""Provider failures, translated into the error codes a run ends with.

The OpenAI and Anthropic SDKs already retry transient failures (429, 5xx, timeouts,
dropped connections) with exponential backoff (`AGENT_PROVIDER_MAX_RETRIES`); what
reaches us here has exhausted those retries or is not worth retrying.
"""

import json
import sys
from typing import TYPE_CHECKING, Any

import httpx
import pydantic

if TYPE_CHECKING:
    import anthropic
    import openai

_SDKS = ("openai", "anthropic")


def _loaded(attribute: str, *modules: str) -> tuple[type[Any], ...]:
    """The exception class `attribute` of each of `modules` that is imported. Only an
    imported SDK can have raised its errors, and only the configured provider imports
    its SDK: importing the openai and anthropic SDKs here (about 60 MiB of memory) would
    load them into every server, the offline one included."""
    return tuple(getattr(sys.modules[name], attribute) for name in modules if name in sys.modules)


def _transport(attribute: str) -> tuple[type[Any], ...]:
    # The SDKs wrap transport failures in their own errors, except the anthropic SDK while
    # it reads a stream: a read timeout or a dropped connection mid-answer comes out raw,
    # from httpx2 (the HTTP client of the openai and anthropic SDKs) or httpx.
    return (*_loaded(attribute, "httpx2"), getattr(httpx, attribute))


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
    if isinstance(
        error,
        (
            *_loaded("APITimeoutError", *_SDKS),
            *_loaded("StreamChunkTimeoutError", "langchain_openai"),
            *_transport("TimeoutException"),
        ),
    ):
        # StreamChunkTimeoutError: langchain-openai's own watchdog on a stream that stays
        # open (keep-alive comments) but sends no content; a TimeoutError subclass.
        return ProviderError(
            "provider_timeout",
            "The model provider did not answer in time (AGENT_PROVIDER_TIMEOUT).",
        )
    if isinstance(error, (*_loaded("APIConnectionError", *_SDKS), *_transport("TransportError"))):
        # Raised both when no connection could be made and when one broke off mid-answer.
        return ProviderError(
            "provider_unreachable",
            "Could not connect to the model provider, or the connection broke off before "
            "the answer was complete: check its URL and that it is running.",
        )
    if isinstance(error, _loaded("APIStatusError", *_SDKS)) and error.status_code >= 400:
        return _status_error(error.status_code, _detail(error))
    if isinstance(
        error,
        (
            *_loaded("APIResponseValidationError", *_SDKS),
            json.JSONDecodeError,
            pydantic.ValidationError,
        ),
    ):
        return ProviderError(
            "provider_bad_response", f"The model provider sent a malformed reply: {error}"
        )
    if isinstance(error, _loaded("APIError", *_SDKS)):
        return _stream_error(error)
    return None


# Error types found in the bodies of errors sent inside a stream (Anthropic's, then
# OpenAI's where they differ), as the HTTP status they would have had.
_STATUS_OF_ERROR_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
    "requests": 429,
    "tokens": 429,
    "rate_limit_exceeded": 429,
    "server_error": 500,
}


def _stream_error(error: "openai.APIError | anthropic.APIError") -> ProviderError:
    """An error the provider reported inside a stream that had started with 200: OpenAI
    sends `{"error": ...}` as a chunk (openai.APIError), Anthropic an `error` event
    (an APIStatusError whose status is the stream's 200). Nothing was retried."""
    body = error.body
    inner = body.get("error", body) if isinstance(body, dict) else None
    error_type = inner.get("type") if isinstance(inner, dict) else None
    status = _STATUS_OF_ERROR_TYPE.get(str(error_type), 500)
    detail = _detail(error) or str(error)[:300]
    if status >= 500:
        return ProviderError(
            "provider_unavailable",
            f"The model provider failed in the middle of its answer ({error_type or 'error'}). "
            f"{detail}",
        )
    return _status_error(status, detail)


def _detail(error: "openai.APIError | anthropic.APIError") -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])[:300]
    return ""
