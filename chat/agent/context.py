from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True, kw_only=True)
class Context:
    """Run-scoped values the graph may read. Ids only: request and consumer objects never
    enter the graph, so the same graph runs in a web process or on a worker."""

    run_id: UUID
    conversation_id: UUID
    user_id: int
    max_steps: int
    context_tokens: int
