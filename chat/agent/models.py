"""Model providers, chosen by AGENT_MODEL: offline (built in), openai, anthropic."""

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from langchain_core.language_models import BaseChatModel
from pydantic import SecretStr

from .errors import ProviderError
from .offline_model import OFFLINE_MODEL_NAME, OfflineChatModel
from .providers import CapsOutput


@dataclass(frozen=True)
class ModelInfo:
    provider: str
    name: str
    label: str

    @property
    def offline(self) -> bool:
        return self.provider == "offline"


def model_info() -> ModelInfo:
    # The label is shown to every user: it names the kind of provider, never its URL
    # (an internal host, a port, a gateway's path are the operator's business).
    provider = settings.AGENT_MODEL
    if provider == "openai":
        name = settings.AGENT_OPENAI_MODEL
        where = "an OpenAI-compatible server" if settings.AGENT_OPENAI_BASE_URL else "OpenAI"
        return ModelInfo(provider, name, f"{name} via {where}")
    if provider == "anthropic":
        name = settings.AGENT_ANTHROPIC_MODEL
        return ModelInfo(provider, name, f"{name} via Anthropic")
    return ModelInfo("offline", OFFLINE_MODEL_NAME, "Offline demo model (no real LLM)")


def chat_model_preload() -> None:
    """Import the configured provider's client where the process starts. It is imported
    only when configured (the SDKs take about 60 MiB of memory), but not on the first
    run either: importing it takes a second or more of CPU, which would stall every
    socket served by the event loop."""
    if settings.AGENT_MODEL == "openai":
        from . import provider_openai  # noqa: F401
    elif settings.AGENT_MODEL == "anthropic":
        from . import provider_anthropic  # noqa: F401


def load_chat_model() -> BaseChatModel:
    provider = settings.AGENT_MODEL
    if provider == "openai":
        return _openai()
    if provider == "anthropic":
        return _anthropic()
    return OfflineChatModel(token_delay=settings.AGENT_OFFLINE_TOKEN_DELAY)


def output_cap(model: BaseChatModel, max_tokens: int) -> dict[str, Any]:
    """The call options that limit `model`'s output to `max_tokens` (the budget may grant
    less than AGENT_MAX_TOKENS); none for a model that has no such option."""
    if isinstance(model, OfflineChatModel):
        return {"max_tokens": max_tokens}
    if isinstance(model, CapsOutput):
        return model.output_cap(max_tokens)
    return {}


def _openai() -> BaseChatModel:
    from .provider_openai import OpenAIChatModel

    api_key = settings.AGENT_OPENAI_API_KEY
    if not api_key and not settings.AGENT_OPENAI_BASE_URL:
        raise ProviderError(
            "provider_not_configured",
            "AGENT_MODEL=openai needs AGENT_OPENAI_API_KEY (or AGENT_OPENAI_BASE_URL for a "
            "local OpenAI-compatible server).",
        )
    return OpenAIChatModel(
        model=settings.AGENT_OPENAI_MODEL,
        # Local OpenAI-compatible servers usually ignore the key, but the SDK wants one.
        api_key=SecretStr(api_key or "not-needed"),
        base_url=settings.AGENT_OPENAI_BASE_URL,
        temperature=settings.AGENT_TEMPERATURE,
        max_completion_tokens=settings.AGENT_MAX_TOKENS,
        timeout=settings.AGENT_PROVIDER_TIMEOUT,
        # The read timeout above restarts on every byte, SSE keep-alive comments included;
        # this bounds the wait for actual content (langchain-openai's own default is 120 s).
        # Twice as long, so that a stream gone wholly silent still ends in the SDK's
        # timeout error rather than in this watchdog's.
        stream_chunk_timeout=2 * settings.AGENT_PROVIDER_TIMEOUT,
        max_retries=settings.AGENT_PROVIDER_MAX_RETRIES,
        stream_usage=True,
        use_responses_api=False,
        # langchain-openai sends the limit as max_completion_tokens; some compatible
        # servers (older vLLM, Ollama, llama.cpp) only honour max_tokens, so send both.
        extra_body={"max_tokens": settings.AGENT_MAX_TOKENS}
        if settings.AGENT_OPENAI_BASE_URL
        else None,
    )


def _anthropic() -> BaseChatModel:
    from .provider_anthropic import AnthropicChatModel

    if not settings.AGENT_ANTHROPIC_API_KEY:
        raise ProviderError(
            "provider_not_configured", "AGENT_MODEL=anthropic needs AGENT_ANTHROPIC_API_KEY."
        )
    return AnthropicChatModel(
        model_name=settings.AGENT_ANTHROPIC_MODEL,
        api_key=SecretStr(settings.AGENT_ANTHROPIC_API_KEY),
        # None: the SDK's default (or ANTHROPIC_BASE_URL); set for a proxy or gateway.
        base_url=settings.AGENT_ANTHROPIC_BASE_URL,
        temperature=settings.AGENT_TEMPERATURE,
        max_tokens_to_sample=settings.AGENT_MAX_TOKENS,
        timeout=settings.AGENT_PROVIDER_TIMEOUT,
        max_retries=settings.AGENT_PROVIDER_MAX_RETRIES,
        stream_usage=True,
        stop=None,
    )
