"""The metrics' label values that chat knows: for the series to start at 0, and to keep
the tool label to the tools there are."""

from prometheus_client import Histogram

from agentsite import metrics

from .agent.models import model_info
from .agent.tools import TOOLS
from .models import Run

TOOL_NAMES = frozenset(tool.name for tool in TOOLS)


def chat_metrics_preinitialise() -> None:
    """Every final run status (whatever statuses Run has: a new one appears by itself),
    every tool and the configured model. Called where a serving process starts (asgi.py;
    a worker process's entry point calls it too)."""
    metrics.metrics_preinitialise(
        run_statuses=[s for s in Run.Status.values if s not in Run.ACTIVE_STATUSES],
        tools=sorted(TOOL_NAMES),
        models=[model_info().name],
    )


def tool_call_observe(*, tool: str, is_error: bool) -> None:
    metrics.TOOL_CALLS.labels(
        tool=tool if tool in TOOL_NAMES else metrics.OTHER_TOOL,
        outcome="error" if is_error else "ok",
    ).inc()


def run_end_observe(*, status: str, error_code: str) -> None:
    """A run ended, however: finished by its executor or closed by the reaper."""
    metrics.RUNS.labels(status=status).inc()
    if error_code and status != Run.Status.CANCELLED:
        metrics.RUN_ERRORS.labels(code=error_code).inc()


# Queue executor: from the run's job entering the queue (its transaction's enqueue) to a
# worker starting it. Clocks of two processes: across hosts, as good as their NTP.
RUN_PICKUP = Histogram(
    "agentsite_run_pickup_seconds",
    "Time a queued run waited for a worker (enqueue to start), AGENT_EXECUTOR=queue.",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def run_pickup_observe(*, seconds: float) -> None:
    RUN_PICKUP.observe(seconds)
