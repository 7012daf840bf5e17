"""The label values chat knows before any run starts, for the metrics to start at 0."""

from agentsite import metrics

from .agent.models import model_info
from .agent.tools import TOOLS
from .models import Run


def chat_metrics_preinitialise() -> None:
    """Every final run status (whatever statuses Run has: a new one appears by itself),
    every tool and the configured model."""
    metrics.metrics_preinitialise(
        run_statuses=[s for s in Run.Status.values if s not in Run.ACTIVE_STATUSES],
        tools=[tool.name for tool in TOOLS],
        models=[model_info().name],
    )
