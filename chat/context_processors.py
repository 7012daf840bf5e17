from typing import Any

from django.http import HttpRequest

from .agent.models import model_info


def agent_model(request: HttpRequest) -> dict[str, Any]:
    return {"agent_model": model_info()}
