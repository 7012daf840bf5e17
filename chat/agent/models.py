"""Model providers, chosen by AGENT_MODEL: offline (built in), openai, anthropic."""

from dataclasses import dataclass

from django.conf import settings
from langchain_core.language_models import BaseChatModel
from pydantic import SecretStr

from .errors import ProviderError
from .offline_model import OFFLINE_MODEL_NAME, OfflineChatModel


@dataclass(frozen=True)
class ModelInfo:
    provider: str
    name: str
    label: str

    @property
    def offline(self) -> bool:
        return self.provider == "offline"


def model_info() -> ModelInfo:
    provider = settings.AGENT_MODEL
    if provider == "openai":
        where = settings.AGENT_OPENAI_BASE_URL or "OpenAI"
        name = settings.AGENT_OPENAI_MODEL
        return ModelInfo(provider, name, f"{name} via {where}")
    if provider == "anthropic":
        where = settings.AGENT_ANTHROPIC_BASE_URL or "Anthropic"
        name = settings.AGENT_ANTHROPIC_MODEL
        return ModelInfo(provider, name, f"{name} via {where}")
    return ModelInfo("offline", OFFLINE_MODEL_NAME, "Offline demo model (no real LLM)")


def load_chat_model() -> BaseChatModel:
    provider = settings.AGENT_MODEL
    if provider == "openai":
        return _openai()
    if provider == "anthropic":
        return _anthropic()
    return OfflineChatModel(token_delay=settings.AGENT_OFFLINE_TOKEN_DELAY)


def _openai() -> BaseChatModel:
    from langchain_openai import ChatOpenAI

    api_key = settings.AGENT_OPENAI_API_KEY
    if not api_key and not settings.AGENT_OPENAI_BASE_URL:
        raise ProviderError(
            "provider_not_configured",
            "AGENT_MODEL=openai needs AGENT_OPENAI_API_KEY (or AGENT_OPENAI_BASE_URL for a "
            "local OpenAI-compatible server).",
        )
    return ChatOpenAI(
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
    from langchain_anthropic import ChatAnthropic

    if not settings.AGENT_ANTHROPIC_API_KEY:
        raise ProviderError(
            "provider_not_configured", "AGENT_MODEL=anthropic needs AGENT_ANTHROPIC_API_KEY."
        )
    return ChatAnthropic(
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
