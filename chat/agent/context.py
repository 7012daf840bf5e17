from dataclasses import dataclass
from uuid import UUID

from .budget import RunBudget


@dataclass(frozen=True, kw_only=True)
class Context:
    """Run-scoped values the graph may read, passed with each run (LangGraph's runtime
    context), so one compiled graph serves every run. Ids, plain values and the run's
    budget meter: request and consumer objects never enter the graph, so the same graph
    runs in a web process or on a worker."""

    run_id: UUID
    conversation_id: UUID
    user_id: int
    max_steps: int
    context_tokens: int
    # Meters the run's model calls; None only where the graph runs alone (its tests).
    budget: RunBudget | None = None
